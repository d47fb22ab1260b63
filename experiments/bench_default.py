"""Benchmark: the embedded default run (`python -m qgplm.run`), wall time and figures.

Runs the default pipeline `--repeats` times in fresh processes (each in its own run dir) and
prints a markdown table from each run's metrics.json. Target: under 3 minutes on
2 CPU cores, end to end (start-up, corpus generation, teacher, student, evaluation).

    python experiments/bench_default.py [--repeats 1] [extra Hydra overrides ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(overrides: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="qgplm-bench-")) / "run"
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "qgplm.run", f"hydra.run.dir={out}", *overrides], cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.time() - t
    if proc.returncode != 0:
        sys.exit(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    m["process_wall_s"] = wall
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    args, overrides = ap.parse_known_args()
    rows = [run_once(overrides) for _ in range(args.repeats)]
    print("| run | teacher PPL | student PPL | ratio | FP32 MiB | quant MiB | compression "
          "| teacher s | student s | process s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, m in enumerate(rows):
        w, s = m["wall_time_s"], m["size"]
        print(f"| {i} | {m['teacher']['test_ppl']:.2f} | {m['student']['test_ppl']:.2f} | {m['ppl_ratio']:.3f} | "
              f"{s['fp32_mib']:.2f} | {s['quantized_mib']:.3f} | {s['compression']:.1f}x | {w['teacher']:.1f} | "
              f"{w['student']:.1f} | {m['process_wall_s']:.1f} |")


if __name__ == "__main__":
    main()
