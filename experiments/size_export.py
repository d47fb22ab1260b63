"""On-disk size of packed exports of full-size, randomly initialised GPT-2 small and BART-base.

    PYTHONPATH=. python experiments/size_export.py [--bits 2 8] [--models gpt2 bart]

For each model: the FP32 `save_pretrained` safetensors file, then packed exports (post-training
quantized: sizes do not depend on the scales, so gamma_init=fixed keeps it fast) at each bit-width,
default (FP32 position embeddings / LayerNorm / biases) and compact (8-bit position embeddings,
fp16 1-D tensors). Prints the breakdown and the ratio FP32 file / packed file.
Paper targets at W2E2 (docs/method.md, "Size accounting"): GPT-2 14.4x, BART-base 13.4x.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

from qgplm.export import export_model
from qgplm.export.format.manifest import WEIGHTS
from qgplm.quant import QuantConfig

MIB = 2**20


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 12 layers, 768 wide, vocab 50257
    # bart-base shape (BartConfig() defaults are bart-large sized)
    cfg = BartConfig(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                     decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, vocab_size=50265)
    return BartForConditionalGeneration(cfg)


def save_fp32(model: torch.nn.Module, out: Path) -> int:
    """Save the float model with `save_pretrained` into `out`; the size of its weights file, the
    FP32 side of every ratio."""
    model.save_pretrained(out)
    return (out / WEIGHTS).stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--models", nargs="+", default=["gpt2", "bart"])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = build(name).eval()
            fp32 = save_fp32(model, Path(tmp) / f"{name}-fp32")
            print(f"== {name}: FP32 {WEIGHTS}: {fp32 / MIB:.1f} MiB")
            for bits in args.bits:
                qc = QuantConfig(weight_bits=bits, embedding_bits=bits, quantizer_kwargs={"gamma_init": "fixed"})
                for compact in (False, True):
                    out = Path(tmp) / f"{name}-w{bits}-{int(compact)}"
                    rep = export_model(model, out, quant_config=qc, position_bits=8 if compact else None,
                                       fp16=compact)
                    tag = f"W{bits}E{bits}" + (" compact" if compact else "")
                    print(f"-- {tag}\n{rep.table()}\n   FP32 file / packed file: {fp32 / rep.file_bytes:.2f} x")
                    rows.append((name, tag, fp32 / MIB, rep.codes_bytes / MIB, rep.scales_bytes / MIB,
                                 rep.fp_bytes / MIB, rep.file_bytes / MIB, fp32 / rep.file_bytes))
            del model
    print("\n| model | export | FP32 file MiB | codes MiB | scales MiB | FP tensors MiB | packed file MiB | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.2f} | {r[4]:.4f} | {r[5]:.2f} | {r[6]:.2f} | {r[7]:.2f}x |")


if __name__ == "__main__":
    main()
