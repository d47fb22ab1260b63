"""Issue #4 benchmark: small BART on the XSum sample, FP teacher then W2E2A8 students, ROUGE table.

    python experiments/bench_bart.py [--methods quantgpt,pact,lsq] [--bits 2] [hydra overrides ...]

1. trains the teacher from scratch once (`experiment=xsum_small stage=teacher`) into
   experiments/results/xsum_small/teacher (reused by later calls);
2. runs a Hydra multirun `stage=quantize method=<methods> bits=<bits>` from it (same schedule,
   same quantized modules, same logits KD; QuantGPT adds its quantizer and the contrastive loss);
3. prints the ROUGE / PPL / size table from every run's metrics.json and writes table.md.
A sweep directory that already exists is not re-run (delete it to re-run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import ROOT, run_sweep, teacher_once


def table(root: Path) -> str:
    rows = []
    teacher = json.loads((root / "teacher" / "metrics.json").read_text())
    keys = [k for k in ("rouge1", "rouge2", "rougeL", "rougeLsum") if k in teacher["teacher"]]
    head = ["model", "bits", *(k.replace("rouge", "R-") for k in keys), "test PPL", "size MiB", "student s"]
    t = teacher["teacher"]
    rows.append(["teacher (FP32)", "W32E32A32", *(f"{t[k]:.2f}" for k in keys), f"{t['test_ppl']:.1f}", "-",
                 f"{teacher['wall_time_s']['teacher']:.0f} (teacher)"])
    for path in sorted(root.glob("*/*/metrics.json")):
        m = json.loads(path.read_text())
        s, c = m["student"], m["config"]
        rows.append([c["method"], c["bits"], *(f"{s[k]:.2f}" for k in keys), f"{s['test_ppl']:.1f}",
                     f"{m['size']['quantized_mib']:.2f}", f"{m['wall_time_s']['student']:.0f}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="xsum_small")
    ap.add_argument("--bits", default="2")
    ap.add_argument("--methods", default="quantgpt,pact,lsq")
    ap.add_argument("--results", type=Path, default=ROOT / "experiments" / "results")
    args, extra = ap.parse_known_args()
    root = args.results / args.experiment
    teacher = teacher_once(root, args.experiment, extra)
    run_sweep(root / f"methods_w{args.bits.replace(',', '-')}",
              [f"experiment={args.experiment}", "stage=quantize", f"teacher_path={teacher}",
               f"method={args.methods}", f"bits={args.bits}", *extra])
    md = table(root)
    (root / "table.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
