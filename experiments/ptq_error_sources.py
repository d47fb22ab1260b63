"""Where post-training quantization error comes from: weights, the embedding, or the 8-bit activations.

    python experiments/ptq_error_sources.py experiments/results/smollm2_wt2/teacher --tokens 2048

Loads a teacher (a `stage=teacher` run dir or an HF model dir) once per row, quantizes only the parts
the row names with `quantize_model` (each quantizer's initial scale, no training: post-training
quantization), and scores `--tokens` tokens of the WikiText-2 test split (128-token windows advancing by
127, every token after the first scored once; unlike the training tables' `EvalWindows`, the last window is
a short one rather than a full window ending at the last token, so its few tokens see less context).
A row whose activations alone (weights in FP32) already lose much of the teacher's perplexity says
that no amount of weight QAT can reach the teacher at that activation setting.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from qgplm.data.token_stream import tokenize_stream
from qgplm.models import load_pretrained, load_tokenizer
from qgplm.quant import QuantConfig, initialize_quantizers, quantize_model

# (row, weight bits, embedding bits, activation bits, symmetric activations); None: full precision
ROWS: tuple[tuple[str, int | None, int | None, int | None, bool], ...] = (
    ("FP32", None, None, None, False),
    ("A8 (per-tensor min-max, asymmetric)", None, None, 8, False),
    ("A8 (per-tensor, symmetric)", None, None, 8, True),
    ("W8E8", 8, 8, None, False),
    ("W8E8A8", 8, 8, 8, False),
    ("W4E4", 4, 4, None, False),
    ("W4E4A8", 4, 4, 8, False),
    ("W2E2", 2, 2, None, False),
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
    """Windows of `block` advancing by block - 1, each token after the first scored once (the last window
    short; `qgplm.data.token_stream.EvalWindows` ends with a full window instead)."""
    nll, count = 0.0, 0
    for start in range(0, max(len(ids) - 1, 1), block - 1):
        window = ids[start: start + block].unsqueeze(0)
        if window.shape[1] < 2:
            break
        logp = torch.log_softmax(model(input_ids=window).logits[0, :-1].float(), dim=-1)
        nll -= float(logp.gather(-1, window[0, 1:, None]).sum())
        count += window.shape[1] - 1
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
    if args.tokens < 2 or not all(r.isdigit() and int(r) < len(ROWS) for r in rows):
        fail(f"--tokens must be at least 2 and --rows numbers from 0 to {len(ROWS) - 1}")
    d = model_dir(args.teacher)
    ids = tokenize_stream(load_tokenizer(str(d)), args.data.read_text(encoding="utf-8"))[: args.tokens + 1]
    torch.manual_seed(0)
    print(f"{d}: {len(ids) - 1} test tokens scored, 128-token windows, post-training quantization (initial scales)")
    print("| row | test PPL | / FP32 | seconds |\n|---|---|---|---|")
    fp = None
    for i in (int(r) for r in rows):
        name, w, e, a, sym = ROWS[i]
        t = time.perf_counter()
        model = load_pretrained(str(d)).float().eval()
        if (w, e, a) != (None, None, None):
            quantize_model(model, QuantConfig(weight_bits=w, embedding_bits=e, activation_bits=a,
                                              activation_symmetric=sym))
            initialize_quantizers(model)
        ppl = perplexity(model, ids)
        fp = ppl if fp is None and i == 0 else fp
        ratio = f"{ppl / fp:.2f}" if fp else "-"
        print(f"| {name} | {ppl:.2f} | {ratio} | {time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
