"""Where post-training quantization error comes from: weights, the embedding, or the 8-bit activations.

    python experiments/ptq_error_sources.py experiments/results/smollm2_wt2/teacher --tokens 2048

Loads a teacher (a `stage=teacher` run dir or an HF model dir) once per row, quantizes only the parts
the row names with `quantize_model` (each quantizer's initial scale, no training: post-training
quantization), and scores the first `--tokens` + 1 tokens of the WikiText-2 test split with the
training runs' evaluation windows (`qgplm.data.token_stream.EvalWindows`: 128 tokens advancing by 127,
every token after the first scored once, the last window ending at the last token).
A row whose activations alone (weights in FP32) already lose much of the teacher's perplexity says
that no amount of weight QAT can reach the teacher at that activation setting. The 8-bit activation
rows come per tensor (the paper's) and per token (`activation_granularity=token`).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from qgplm.data.token_stream import IGNORE_INDEX, EvalWindows, tokenize_stream
from qgplm.models import load_pretrained, load_tokenizer
from qgplm.quant import QuantConfig, initialize_quantizers, quantize_model

# (row, weight bits, embedding bits, activation bits, symmetric activations, activation granularity
# [, extra QuantConfig fields]); None: full precision. QuantGPT's quantizer with its default initial gamma
# unless the extra fields say otherwise. New rows go at the end: row numbers are how the docs' commands
# name them.
Row = tuple[str, int | None, int | None, int | None, bool, str] | tuple[
    str, int | None, int | None, int | None, bool, str, dict[str, Any]]
ROWS: tuple[Row, ...] = (
    ("FP32", None, None, None, False, "tensor"),
    ("A8 (per-tensor min-max, asymmetric)", None, None, 8, False, "tensor"),
    ("A8 (per-tensor, symmetric)", None, None, 8, True, "tensor"),
    ("W8E8", 8, 8, None, False, "tensor"),
    ("W8E8A8", 8, 8, 8, False, "tensor"),
    ("W4E4", 4, 4, None, False, "tensor"),
    ("W4E4A8", 4, 4, 8, False, "tensor"),
    ("W2E2", 2, 2, None, False, "tensor"),
    ("A8 (per-token min-max, asymmetric)", None, None, 8, False, "token"),
    ("A8 (per-token, symmetric)", None, None, 8, True, "token"),
    ("W8E8A8 (per-token A8)", 8, 8, 8, False, "token"),
    ("W4E4A8 (per-token A8)", 4, 4, 8, False, "token"),
    ("W4 (linear weights only)", 4, None, None, False, "tensor"),
    ("E4 (embedding and tied head only)", None, 4, None, False, "tensor"),
    ("W4E4, one scale per output row", 4, 4, None, False, "tensor", {"per_row": True}),
    ("W4E4A8 (per-token A8), one scale per output row", 4, 4, 8, False, "token", {"per_row": True}),
    ("W4E4, gamma_init=fixed (3.0)", 4, 4, None, False, "tensor", {"quantizer_kwargs": {"gamma_init": "fixed"}}),
    ("W4E4, lsq", 4, 4, None, False, "tensor", {"quantizer": "lsq"}),
    ("W4E4A8 (per-token A8), one scale per output row, gamma_init=fixed (3.0)", 4, 4, 8, False, "token",
     {"per_row": True, "quantizer_kwargs": {"gamma_init": "fixed"}}),
    ("W4E4A8 (per-token A8), one scale per output row, lsq", 4, 4, 8, False, "token",
     {"per_row": True, "quantizer": "lsq"}),
)


def fail(message: str) -> None:
    """One `error:` line and exit code 2, the project's rule for bad input."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def model_dir(path: Path) -> Path:
    for d in (path / "teacher", path):
        if (d / "config.json").is_file():
            return d
    fail(f"{path} holds no HF model (config.json, in it or in teacher/): pass a teacher run dir")


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, block: int = 128) -> float:
    """Perplexity over `EvalWindows(ids, block, block - 1)`, the training runs' test protocol."""
    nll, count = 0.0, 0
    for window in EvalWindows(ids, block, block - 1):
        logits = model(input_ids=window["input_ids"].unsqueeze(0)).logits[0, :-1].float()
        labels = window["labels"][1:]
        scored = labels != IGNORE_INDEX
        logp = torch.log_softmax(logits[scored], dim=-1)
        nll -= float(logp.gather(-1, labels[scored, None]).sum())
        count += int(scored.sum())
    return math.exp(nll / count)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("teacher", type=Path, help="a stage=teacher run dir or an HF model dir")
    ap.add_argument("--tokens", type=int, default=2048, help="test tokens scored (the first tokens + 1 read)")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
                    / "wikitext-2" / "wiki.test.tokens")
    ap.add_argument("--rows", default=",".join(str(i) for i in range(len(ROWS))),
                    help="comma-separated row numbers of ROWS (default: all)")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        fail(f"{args.data} does not exist: pass --data <wiki.test.tokens>")
    rows = [r.strip() for r in args.rows.split(",")]
    if args.tokens < 128 or not all(r.isdigit() and int(r) < len(ROWS) for r in rows):
        fail(f"--tokens must be at least 128 (one window) and --rows numbers from 0 to {len(ROWS) - 1}")
    d = model_dir(args.teacher)
    ids = tokenize_stream(load_tokenizer(str(d)), args.data.read_text(encoding="utf-8"))[: args.tokens + 1]
    torch.manual_seed(0)
    print(f"{d}: {len(ids) - 1} test tokens scored, 128-token windows, post-training quantization (initial scales)")
    print("| row | test PPL | / FP32 | seconds |\n|---|---|---|---|")
    fp = None
    for i in (int(r) for r in rows):
        name, w, e, a, sym, granularity, *extra = ROWS[i]
        t = time.perf_counter()
        model = load_pretrained(str(d)).float().eval()
        if (w, e, a) != (None, None, None):
            quantize_model(model, QuantConfig(weight_bits=w, embedding_bits=e, activation_bits=a,
                                              activation_symmetric=sym, activation_granularity=granularity,
                                              **(extra[0] if extra else {})))
            initialize_quantizers(model)
        ppl = perplexity(model, ids)
        fp = ppl if fp is None and i == 0 else fp
        ratio = f"{ppl / fp:.2f}" if fp else "-"
        print(f"| {name} | {ppl:.2f} | {ratio} | {time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
