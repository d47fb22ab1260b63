"""`python -m qgplm.generate dir=<export> prompt="..." [mode=lowbit|int8|dequantize|gguf] [max_new_tokens=32]`

Loads a packed export (qgplm.load_quantized) and prints a greedy continuation of the prompt
(causal LM, e.g. GPT-2) or the generated output sequence, i.e. the summary (seq2seq, e.g. BART),
with Hugging Face `generate`. mode=lowbit keeps the weights at their bit-width and runs the linear
layers on onnxruntime's MatMulNBits kernel (block_size= sets its block, 64 by default). mode=gguf
runs the model.gguf of a `python -m qgplm.export ... format=gguf` dir on llama.cpp (GPT-2, Llama,
Mistral, Qwen2), with
the dir's own tokenizer, greedy and KV-cached.
"""

from __future__ import annotations

import torch

from qgplm.errors import QgplmError
from qgplm.export.cli import parse_kv, run_main

USAGE = ('python -m qgplm.generate dir=<export dir> prompt="..." [mode=dequantize|int8|lowbit|gguf] '
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


def generate_gguf(export_dir: str, prompt: str, max_new_tokens: int, threads: int) -> str:
    """Greedy continuation on llama.cpp of a format=gguf dir (its tokenizer files sit beside model.gguf)."""
    from transformers import AutoConfig

    from qgplm.export.gguf import LlamaCppLM, context_length, gguf_path
    from qgplm.models.loading import load_tokenizer

    gguf_path(export_dir)
    tokenizer = load_tokenizer(export_dir, key="dir")
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise QgplmError("prompt is empty after tokenization: pass a non-empty prompt=")
    limit = context_length(AutoConfig.from_pretrained(export_dir, local_files_only=True))
    if len(ids) + max_new_tokens > limit:
        raise QgplmError(f"{len(ids)} prompt tokens + max_new_tokens={max_new_tokens} exceed the model's "
                         f"{limit} positions: shorten the prompt or lower max_new_tokens")
    lm = LlamaCppLM(export_dir, n_ctx=len(ids) + max_new_tokens, threads=threads or None)
    try:
        new = lm.greedy(ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    finally:
        lm.close()
    return tokenizer.decode(new, skip_special_tokens=True)


def main(argv: list[str]) -> int:
    args = parse_kv(argv, SPEC, USAGE)
    if args["threads"] > 0:
        torch.set_num_threads(args["threads"])
    if args["mode"] == "gguf":
        if args["block_size"]:
            raise QgplmError("block_size= only applies to mode=lowbit (got mode=gguf)")
        print(generate_gguf(args["dir"], args["prompt"], args["max_new_tokens"], args["threads"]))
        return 0
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
