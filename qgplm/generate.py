"""`python -m qgplm.generate dir=<export> prompt="..." [mode=lowbit|int8|dequantize] [max_new_tokens=32]`

Loads a packed export (qgplm.load_quantized) and prints a greedy continuation of the prompt
(causal LM, e.g. GPT-2) or the generated output sequence, i.e. the summary (seq2seq, e.g. BART),
with Hugging Face `generate`. mode=lowbit keeps the weights at their bit-width and runs the linear
layers on onnxruntime's MatMulNBits kernel (block_size= sets its block, 64 by default).
"""

from __future__ import annotations

import torch

from qgplm.errors import QgplmError
from qgplm.export.cli import parse_kv, run_main

USAGE = ('python -m qgplm.generate dir=<export dir> prompt="..." [mode=dequantize|int8|lowbit] '
         '[max_new_tokens=32] [threads=N] [block_size=64]')
SPEC = {"dir": (str, ...), "prompt": (str, ...), "mode": (str, "dequantize"), "max_new_tokens": (int, 32),
        "threads": (int, 0), "block_size": (int, 0)}


def generate_text(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    enc = tokenizer(prompt, return_tensors="pt")
    if enc["input_ids"].numel() == 0:
        raise QgplmError("prompt is empty after tokenization: pass a non-empty prompt=")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    if getattr(model.config, "is_encoder_decoder", False):
        return tokenizer.decode(out[0], skip_special_tokens=True)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str]) -> int:
    args = parse_kv(argv, SPEC, USAGE)
    if args["threads"] > 0:
        torch.set_num_threads(args["threads"])
    from qgplm.export.loader import load_export_tokenizer, load_quantized

    options = {"block_size": args["block_size"]} if args["block_size"] else {}
    if options and args["mode"] != "lowbit":
        raise QgplmError(f"block_size= only applies to mode=lowbit (got mode={args['mode']})")
    model = load_quantized(args["dir"], args["mode"], **options)
    tokenizer = load_export_tokenizer(args["dir"])
    if tokenizer is None:
        raise QgplmError(f"{args['dir']} was exported without a tokenizer: export it with one "
                         f"(export_model(model, out, tokenizer))")
    print(generate_text(model, tokenizer, args["prompt"], args["max_new_tokens"]))
    return 0


if __name__ == "__main__":
    run_main(main)
