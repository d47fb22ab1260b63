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

import os
from pathlib import Path
from typing import Any

import torch

from qgplm.checks import choice
from qgplm.cli.args import parse_kv, run_main
from qgplm.errors import QgplmError
from qgplm.export.runtimes.llamacpp import context_length

USAGE = ('python -m qgplm.generate dir=<export dir> prompt="..." [mode=dequantize|int8|lowbit|gguf] '
         '[max_new_tokens=32] [threads=N] [block_size=64]')
SPEC = {"dir": (str, ...), "prompt": (str, ...), "mode": (str, "dequantize"), "max_new_tokens": (int, 32),
        "threads": (int, 0), "block_size": (int, 0)}


MODES = ("dequantize", "int8", "lowbit", "gguf")


def check_args(args: dict[str, Any]) -> None:
    """Type and range of every argument, before anything is loaded."""
    choice("mode", args["mode"], MODES)
    if "\0" in args["dir"] or not args["dir"].strip():
        raise QgplmError(f"dir={args['dir']!r} is not a path: pass dir=<export dir>")
    if not args["prompt"].strip():
        raise QgplmError('prompt= is empty: pass the text to continue, e.g. prompt="The"')
    if args["max_new_tokens"] < 1:
        raise QgplmError(f"max_new_tokens must be >= 1, got {args['max_new_tokens']}: set max_new_tokens=32")
    cores = os.cpu_count() or 1
    if not 0 <= args["threads"] <= cores:
        raise QgplmError(f"threads must be in 0..{cores} (this machine's cores; 0 = all), got {args['threads']}")
    block = args["block_size"]
    if block:
        if args["mode"] != "lowbit":
            raise QgplmError(f"block_size= only applies to mode=lowbit (got mode={args['mode']})")
        if block < 16 or block & (block - 1):
            raise QgplmError(f"block_size={block} is not valid: use a power of 2 >= 16 (64 is the fast default)")
    d = Path(args["dir"]).expanduser()
    if not d.is_dir():
        raise QgplmError(f"dir={d} is not a directory: pass an export dir written by python -m qgplm.export")


def check_positions(config: Any, prompt_tokens: int, max_new_tokens: int) -> None:
    """The prompt and the continuation must fit the model's positions (beyond them the position
    embedding lookup fails): a causal LM holds both in one sequence, an encoder-decoder the
    prompt in its encoder and the output (after its start token) in its decoder."""
    try:
        limit = context_length(config)
    except AttributeError:  # a config without a position count: nothing to check against
        return
    if getattr(config, "is_encoder_decoder", False):
        if prompt_tokens > limit:
            raise QgplmError(f"the prompt is {prompt_tokens} tokens, more than the model's {limit} positions: "
                             f"shorten the prompt")
        if max_new_tokens + 1 > limit:
            raise QgplmError(f"max_new_tokens={max_new_tokens} exceeds the model's {limit} positions: "
                             f"set max_new_tokens<={limit - 1}")
    elif prompt_tokens + max_new_tokens > limit:
        raise QgplmError(f"{prompt_tokens} prompt tokens + max_new_tokens={max_new_tokens} exceed the model's "
                         f"{limit} positions: shorten the prompt or lower max_new_tokens")


def generate_text(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    enc = tokenizer(prompt, return_tensors="pt")
    if enc["input_ids"].numel() == 0:
        raise QgplmError("prompt is empty after tokenization: pass a non-empty prompt=")
    check_positions(model.config, enc["input_ids"].shape[1], max_new_tokens)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    if getattr(model.config, "is_encoder_decoder", False):
        return tokenizer.decode(out[0], skip_special_tokens=True)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def generate_gguf(export_dir: str, prompt: str, max_new_tokens: int, threads: int) -> str:
    """Greedy continuation on llama.cpp of a format=gguf dir (its tokenizer files sit beside model.gguf)."""
    from transformers import AutoConfig

    from qgplm.export.runtimes.llamacpp import LlamaCppLM, gguf_path
    from qgplm.models.loading import load_tokenizer

    gguf_path(export_dir)
    tokenizer = load_tokenizer(export_dir, key="dir")
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise QgplmError("prompt is empty after tokenization: pass a non-empty prompt=")
    check_positions(_export_config(export_dir, AutoConfig), len(ids), max_new_tokens)
    lm = LlamaCppLM(export_dir, n_ctx=len(ids) + max_new_tokens, threads=threads or None)
    try:
        new = lm.greedy(ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    finally:
        lm.close()
    return tokenizer.decode(new, skip_special_tokens=True)


def _export_config(export_dir: str, auto_config: Any) -> Any:
    try:
        return auto_config.from_pretrained(export_dir, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        from qgplm.models.loading import CUSTOM_CODE, custom_code_error

        if CUSTOM_CODE in str(e):
            raise custom_code_error("dir", str(export_dir)) from None
        raise QgplmError(f"cannot read {export_dir}/config.json ({str(e).splitlines()[0][:200]}): the export is "
                         f"incomplete, export the model again") from None


def main(argv: list[str]) -> int:
    args = parse_kv(argv, SPEC, USAGE)
    check_args(args)
    if args["threads"] > 0:
        torch.set_num_threads(args["threads"])
    if args["mode"] == "gguf":
        print(generate_gguf(args["dir"], args["prompt"], args["max_new_tokens"], args["threads"]))
        return 0
    from transformers import AutoConfig

    from qgplm.export.loader import load_export_tokenizer, load_quantized

    tokenizer = load_export_tokenizer(args["dir"])  # reads and checks the manifest first
    if tokenizer is None:
        raise QgplmError(f"{args['dir']} was exported without a tokenizer: export it with one "
                         f"(export_model(model, out, tokenizer))")
    prompt_tokens = len(tokenizer(args["prompt"])["input_ids"])
    if prompt_tokens == 0:
        raise QgplmError("prompt is empty after tokenization: pass a non-empty prompt=")
    check_positions(_export_config(args["dir"], AutoConfig), prompt_tokens, args["max_new_tokens"])
    options = {"block_size": args["block_size"]} if args["block_size"] else {}
    model = load_quantized(args["dir"], args["mode"], **options)
    print(generate_text(model, tokenizer, args["prompt"], args["max_new_tokens"]))
    return 0


if __name__ == "__main__":
    run_main(main)
