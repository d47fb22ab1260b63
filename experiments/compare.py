"""The fair comparison of issue #3: one teacher, every method at the same budget, one table.

    python experiments/compare.py --experiment wt2_small --bits 2 [--ablations]
    python experiments/compare.py --experiment wt2_small --bits 4,8
    python experiments/compare.py --experiment wt2_small --bits 2 --methods quantgpt,lsq --seeds 1,2

1. trains the teacher once (`stage=teacher`) into experiments/results/<experiment>/teacher,
   reused by every later call;
2. runs a Hydra multirun `method=<methods> bits=<bits>` of `stage=quantize` from that teacher
   (same schedule, same quantized modules, same 8-bit activations, same KD loss);
3. with --ablations, a second multirun over the QuantGPT ablations at W2E2A8;
   with --seeds, the same sweep over those seeds as well (the table reports mean ± std);
4. prints the tables of experiments/table.py and writes table.md and ppl_vs_bits.png.
Sweeps whose directory already exists are not re-run (delete it to re-run).
Extra arguments are passed to every run as Hydra overrides (e.g. student.max_steps=1000 trainer=gpu).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = "quantgpt,quantgpt_full_grid,pact,lsq,laq,twn,minmax"
ABLATIONS = [
    ("ablations", ["method=quantgpt_no_contrastive,quantgpt_pact_grad,kd_only"]),
    ("negatives", ["method=quantgpt", "method.distill.negatives=student,random"]),
]


def qgplm_run(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "qgplm.run", *args]
    print("+", " ".join(cmd), flush=True)
    t = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    print(f"  done in {time.time() - t:.0f} s", flush=True)


def teacher_once(root: Path, experiment: str, extra: list[str]) -> Path:
    """<root>/teacher: trained by `stage=teacher` the first time, reused afterwards."""
    teacher = root / "teacher"
    if not (teacher / "metrics.json").is_file():
        qgplm_run([f"experiment={experiment}", "stage=teacher", f"hydra.run.dir={teacher}", *extra])
    return teacher


def run_sweep(sweep_dir: Path, overrides: list[str]) -> None:
    """A Hydra multirun into `sweep_dir`, unless that directory exists already."""
    if sweep_dir.exists():
        print(f"skip {sweep_dir} (exists)")
        return
    qgplm_run(["-m", *overrides, f"hydra.sweep.dir={sweep_dir}"])


def supported_bits(method: str) -> tuple[int, ...]:
    """The weight bit-widths the quantizer of conf/method/<method>.yaml accepts."""
    from hydra import compose, initialize_config_dir

    from qgplm.quant import WEIGHT_QUANTIZERS

    known = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
    if method not in known:
        sys.exit(f"error: --methods {method}: no such method (conf/method/{method}.yaml): choose from {', '.join(known)}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        quantizer = compose(config_name="run", overrides=[f"method={method}"]).method.quantizer
    return tuple(getattr(WEIGHT_QUANTIZERS[quantizer], "supported_bits", range(1, 33)))


def method_sweeps(methods: str, bits: str, seeds: str | None, default_methods: bool) -> list[tuple[str, list[str]]]:
    """One multirun per group of methods that accept the same requested bit-widths (TWN: 2 bits
    only), named methods_w<bits>[_<methods>][_seeds<seeds>]; methods that accept none are skipped."""
    groups: dict[tuple[int, ...], list[str]] = {}
    wanted = [int(b) for b in bits.split(",")]
    for m in methods.split(","):
        accepted = supported_bits(m)  # composes the method's config: once per method
        ok = tuple(b for b in wanted if b in accepted)
        if not ok:
            print(f"skip method={m}: its quantizer does not take bits {bits}")
            continue
        if len(ok) < len(wanted):
            print(f"method={m} runs at bits {','.join(map(str, ok))} only (its quantizer's bit-widths)")
        groups.setdefault(ok, []).append(m)
    sweeps = []
    for ok, ms in groups.items():
        tag = "-".join(map(str, ok))
        name = f"methods_w{tag}"
        if not (default_methods and ok == tuple(wanted)) or seeds:
            name += f"_{'-'.join(ms)}"
        overrides = [f"method={','.join(ms)}", f"bits={','.join(map(str, ok))}"]
        if seeds:
            name += f"_seeds{seeds.replace(',', '-')}"
            overrides.append(f"seed={seeds}")
        sweeps.append((name, overrides))
    return sweeps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="wt2_small")
    ap.add_argument("--bits", default="2")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--ablations", action="store_true")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds for extra runs of --methods (default: "
                    "the config's seed only)")
    ap.add_argument("--results", type=Path, default=ROOT / "experiments" / "results")
    args, extra = ap.parse_known_args()
    root = args.results / args.experiment
    # planned before the teacher trains: a bad --methods / --bits fails now, not 20 minutes later
    sweeps = method_sweeps(args.methods, args.bits, args.seeds, args.methods == METHODS)
    if args.ablations:
        sweeps += [(name, [*ov, "bits=2"]) for name, ov in ABLATIONS]
    teacher = teacher_once(root, args.experiment, extra)
    common = [f"experiment={args.experiment}", "stage=quantize", f"teacher_path={teacher}", *extra]
    for name, overrides in sweeps:
        run_sweep(root / name, [*common, *overrides])
    subprocess.run([sys.executable, str(ROOT / "experiments" / "table.py"), str(root)], check=True)


if __name__ == "__main__":
    main()
