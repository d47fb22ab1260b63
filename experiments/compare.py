"""The fair comparison: one teacher, every method at the same budget, one table.

    python experiments/compare.py --experiment wt2_small --bits 2 [--ablations]
    python experiments/compare.py --experiment wt2_small --bits 4,8
    python experiments/compare.py --experiment wt2_small --bits 2 --methods quantgpt,lsq --seeds 1,2
    python experiments/compare.py --experiment smollm2_wt2 --bits 2 --methods quantgpt --ptq 2,4,8

1. trains the teacher once (`stage=teacher`) into experiments/results/<experiment>/teacher,
   reused by every later call;
2. runs a Hydra multirun `method=<methods> bits=<bits>` of `stage=quantize` from that teacher
   (same schedule, same quantized modules, same 8-bit activations, same KD loss);
3. with --ptq <bits>, post-training quantization rows: every method at those bit-widths with
   `student.max_steps=0` (the quantizer's initial scales, no QAT), sweep ptq_w<bits>;
   with --ablations, a second multirun over the QuantGPT ablations at W2E2A8;
   with --seeds, the same sweep over those seeds as well (the table reports mean ± std);
4. prints the tables of experiments/table.py and writes table.md and ppl_vs_bits.png.
Sweeps whose directory already exists are not re-run (delete it to re-run).
Extra arguments are passed to every run as Hydra overrides (e.g. student.max_steps=1000 trainer=gpu).

Any `experiment=` preset works unchanged, e.g. the paper recipes (docs/recipes.md):
    python experiments/compare.py --experiment paper_gpt2_wikitext2 --bits 2,4,8 --gpus 0,1,2,3
With --gpus the jobs of each sweep (methods x bits x seeds) run in parallel, one per listed GPU
(CUDA_VISIBLE_DEVICES=<id>, each job on its own device, into <sweep>/<job number> like Hydra's
multirun; a job's output goes to <sweep>/<job number>.out); the teacher trains first with all
listed GPUs visible (add trainer=ddp to train it, and every student, data-parallel). Without
--gpus the sweep is one Hydra multirun, its jobs one after the other, each with the trainer the
overrides choose (trainer=gpu: one GPU; trainer=ddp: all GPUs of the node).
In --gpus mode a job whose directory holds metrics.json is skipped (done), and one whose directory
exists without it (failed or interrupted) is reported and skipped: delete it to re-run.
"""

from __future__ import annotations

import argparse
import itertools
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


def qgplm_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "qgplm.run", *args]


def qgplm_run(args: list[str], gpus: list[str] | None = None) -> None:
    cmd = qgplm_cmd(args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    print("+", f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}" if gpus else "", " ".join(cmd), flush=True)
    t = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, env=env)
    print(f"  done in {time.time() - t:.0f} s", flush=True)


def teacher_once(root: Path, experiment: str, extra: list[str], gpus: list[str] | None = None) -> Path:
    """<root>/teacher: trained by `stage=teacher` the first time, reused afterwards."""
    teacher = root / "teacher"
    if not (teacher / "metrics.json").is_file():
        qgplm_run([f"experiment={experiment}", "stage=teacher", f"hydra.run.dir={teacher}", *extra], gpus)
    return teacher


def expand_grid(overrides: list[str]) -> list[list[str]]:
    """The jobs of a sweep, in Hydra's basic-sweeper order (first override varies slowest):
    ["method=a,b", "bits=2,4"] -> [[method=a, bits=2], [method=a, bits=4], [method=b, bits=2], ...]."""
    axes = []
    for o in overrides:
        key, _, values = o.partition("=")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(job) for job in itertools.product(*axes)]


def run_parallel(sweep_dir: Path, common: list[str], overrides: list[str], gpus: list[str]) -> list[str]:
    """Every job of the sweep as its own `qgplm.run` into <sweep_dir>/<n>, at most one per GPU at
    a time (CUDA_VISIBLE_DEVICES=<gpu>). Returns the failed jobs (one line each)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    pending = []
    for n, job in enumerate(expand_grid(overrides)):
        d = sweep_dir / str(n)
        if (d / "metrics.json").is_file():
            print(f"skip {d} (done)")
        elif d.exists():
            print(f"skip {d}: it exists without metrics.json (a failed or interrupted job): delete it to re-run")
        else:
            pending.append((n, job, d))
    free, running, failed = list(gpus), [], []
    while pending or running:
        while pending and free:
            n, job, d = pending.pop(0)
            gpu = free.pop(0)
            cmd = qgplm_cmd([*common, *job, f"hydra.run.dir={d}"])
            log = open(sweep_dir / f"{n}.out", "w")
            print(f"+ [gpu {gpu}] job {n}: {' '.join(job)}", flush=True)
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": gpu}
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((proc, gpu, n, job, log, time.time()))
        time.sleep(0.2)
        for item in [r for r in running if r[0].poll() is not None]:
            proc, gpu, n, job, log, t = item
            running.remove(item)
            log.close()
            free.append(gpu)
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"  [gpu {gpu}] job {n} {status} in {time.time() - t:.0f} s", flush=True)
            if proc.returncode != 0:
                failed.append(f"{sweep_dir / str(n)} ({' '.join(job)}): see {sweep_dir / f'{n}.out'}")
    return failed


def run_sweep(sweep_dir: Path, overrides: list[str]) -> None:
    """A Hydra multirun into `sweep_dir`, unless that directory exists already."""
    if sweep_dir.exists():
        print(f"skip {sweep_dir} (exists)")
        return
    qgplm_run(["-m", *overrides, f"hydra.sweep.dir={sweep_dir}"])


def supported_bits(method: str) -> tuple[int, ...]:
    """The weight bit-widths the quantizer of conf/method/<method>.yaml accepts."""
    from hydra import compose, initialize_config_dir

    from qgplm.quant import quantizer_kind

    known = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
    if method not in known:
        sys.exit(f"error: --methods {method}: no such method (conf/method/{method}.yaml): "
                 f"choose from {', '.join(known)}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        quantizer = compose(config_name="run", overrides=[f"method={method}"]).method.quantizer
    return quantizer_kind(quantizer).supported_bits


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


def ptq_sweeps(methods: str, bits: str) -> list[tuple[str, list[str]]]:
    """The method sweeps at `bits` with no QAT steps, renamed ptq_w<bits>[...]: post-training quantization with
    each quantizer's initial scales (the same quantized modules and 8-bit activations as the QAT rows)."""
    return [("ptq" + name.removeprefix("methods"), [*ov, "student.max_steps=0"])
            for name, ov in method_sweeps(methods, bits, None, methods == METHODS)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="wt2_small")
    ap.add_argument("--bits", default="2")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--ablations", action="store_true")
    ap.add_argument("--ptq", default=None, help="comma-separated bit-widths of post-training quantization rows "
                    "(every --methods method, student.max_steps=0)")
    ap.add_argument("--no-qat", action="store_true", help="skip the QAT sweep of --methods x --bits (e.g. to run "
                    "only --ptq or --ablations rows)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds for extra runs of --methods (default: "
                    "the config's seed only)")
    ap.add_argument("--results", type=Path, default=ROOT / "experiments" / "results")
    ap.add_argument("--gpus", default=None, help="comma-separated GPU ids: run each sweep's jobs in parallel, one "
                    "per GPU (default: one Hydra multirun, jobs in sequence)")
    args, extra = ap.parse_known_args()
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    root = args.results / args.experiment
    # planned before the teacher trains: a bad --methods / --bits fails now, not 20 minutes later
    sweeps = [] if args.no_qat else method_sweeps(args.methods, args.bits, args.seeds, args.methods == METHODS)
    if args.ptq:
        sweeps += ptq_sweeps(args.methods, args.ptq)
    if args.ablations:
        sweeps += [(name, [*ov, "bits=2"]) for name, ov in ABLATIONS]
    teacher = teacher_once(root, args.experiment, extra, gpus)
    common = [f"experiment={args.experiment}", "stage=quantize", f"teacher_path={teacher}", *extra]
    failed: list[str] = []
    for name, overrides in sweeps:
        if gpus:
            failed += run_parallel(root / name, common, overrides, gpus)
        else:
            run_sweep(root / name, [*common, *overrides])
    subprocess.run([sys.executable, str(ROOT / "experiments" / "table.py"), str(root)], check=True)
    if failed:
        sys.exit(f"error: {len(failed)} job(s) failed:\n  " + "\n  ".join(failed))


if __name__ == "__main__":
    main()
