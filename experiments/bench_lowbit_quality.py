"""Quality of the inference modes on a trained student: test PPL (and ROUGE for summarization)
of the run's own export, loaded as fake-quant (`dequantize`, logits identical to the student),
`int8` and `lowbit`, and (GPT-2 runs) its `format=gguf` file on llama.cpp (`gguf`), with the run's
own task, data and protocol.

    PYTHONPATH=. python experiments/bench_lowbit_quality.py <run dir> [<run dir> ...] [--modes ...]

A run dir is a `stage=pipeline|quantize` run (it holds `export/` and `.hydra/config.yaml`), e.g.
`python -m qgplm.run experiment=wt2_small ...` or `experiment=xsum_small`. Prints one table row per
(run, mode) and the change against dequantize (= the fake-quant student).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import OmegaConf

from qgplm.export import load_quantized
from qgplm.tasks import build_task
from qgplm.train.config import RunConfig
from qgplm.train.module import LMModule
from qgplm.train.pipeline import prepare_data


def run_config(run_dir: Path) -> RunConfig:
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    OmegaConf.update(cfg, "output_dir", str(run_dir), force_add=True)
    if "paths" in cfg:
        OmegaConf.update(cfg, "paths.output_dir", str(run_dir), force_add=True)
    return RunConfig.from_hydra(cfg)


def load(run_dir: Path, mode: str, tmp: Path, threads: int) -> torch.nn.Module:
    """The run's export in one inference mode; gguf: written to `tmp` and run on llama.cpp."""
    if mode != "gguf":
        return load_quantized(run_dir / "export", mode)
    from transformers import AutoConfig

    from qgplm.export.converters.gguf import export_gguf
    from qgplm.export.runtimes.llamacpp import LlamaCppCausalLM

    export_gguf(run_dir / "export", tmp / "gguf")
    return LlamaCppCausalLM(tmp / "gguf", AutoConfig.from_pretrained(run_dir / "export"), threads=threads)


def evaluate(run_dir: Path, modes: list[str], threads: int = 2) -> list[tuple[str, dict[str, float], float]]:
    import tempfile

    cfg = run_config(run_dir)
    tokenizer, dm = prepare_data(cfg)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="qgplm-quality-"))
    for mode in modes:
        if mode == "gguf" and cfg.model.kind != "causal":
            print(f"{run_dir.name}: gguf skipped (llama.cpp has no encoder-decoder BART)")
            continue
        model = load(run_dir, mode, tmp, threads)
        evaluator = build_task(cfg.task).evaluator(tokenizer, dm)
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        t = time.perf_counter()
        res = trainer.test(LMModule(model, cfg.student.optim, 1, evaluator), datamodule=dm, verbose=False)[0]
        rows.append((mode, {k.removeprefix("test/"): float(v) for k, v in res.items()}, time.perf_counter() - t))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--modes", nargs="+", default=["dequantize", "int8", "lowbit", "gguf"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = []
    for run in args.runs:
        rows = evaluate(run, args.modes, args.threads)
        ref = dict(next((r for m, r, _ in rows if m == "dequantize"), rows[0][1]))
        for mode, res, secs in rows:
            cells = []
            for key, value in res.items():
                delta = (f"{100 * (value / ref[key] - 1):+.2f}%" if key == "ppl"
                         else f"{value - ref[key]:+.2f} pts")
                cells.append(f"{key} {value:.2f} ({delta})")
            out.append(f"| {run.name} | {mode} | {'; '.join(cells)} | {secs:.0f} |")
            print(out[-1], flush=True)
    print("\n| run | mode | test metrics (change vs dequantize = the fake-quant student) | eval s |")
    print("|---|---|---|---|")
    print("\n".join(out))


if __name__ == "__main__":
    main()
