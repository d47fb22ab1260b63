"""`python -m qgplm.export ckpt=<run dir or .ckpt> out=<dir> [position_bits=8] [fp16=true] [format=onnx|gguf]`

Writes the trained student of a run as a packed export (see qgplm.export) and prints its size
breakdown. `model=<saved HF model dir>` instead of ckpt= quantizes a float model post-training
(weight_bits=, embedding_bits=, quantizer= choose how). `format=onnx` writes a standalone ONNX
model instead (export/converters/onnx.py: GPT-2 and BART; block_size= of its MatMulNBits layers), `format=gguf`
a llama.cpp GGUF file (export/converters/gguf.py: GPT-2, Llama, Mistral, Qwen2; 2-bit codes as TQ2_0, or where a
row is not a multiple of 256 long as Q2_0 or Q4_0, `gguf_2bit=q2_0|q4_0`).
"""

from __future__ import annotations

from qgplm.checks import choice
from qgplm.cli.args import parse_kv, run_main
from qgplm.errors import QgplmError
from qgplm.export.converters.ggml_blocks import TWO_BIT

USAGE = ("python -m qgplm.export ckpt=<run dir or .ckpt> out=<dir> [position_bits=8] [fp16=true] "
         "[format=qgplm|onnx|gguf] [gguf_2bit=q2_0|q4_0]")
FORMATS = ("qgplm", "onnx", "gguf")
SPEC = {"ckpt": (str, None), "model": (str, None), "kind": (str, "causal"), "out": (str, ...),
        "weight_bits": ("opt_int", 2), "embedding_bits": ("opt_int", 2), "quantizer": (str, "quantgpt"),
        "position_bits": ("opt_int", None), "fp16": (bool, False), "format": (str, "qgplm"),
        "block_size": ("opt_int", None), "gguf_2bit": (str, None)}


KINDS = ("causal", "seq2seq")



def _bits(key: str, value: int | None) -> None:
    if value is not None and not 1 <= value <= 8:
        raise QgplmError(f"{key}={value} is not valid: use an integer in 1..8, or null to keep FP32")


def check_args(args: dict) -> None:
    """Type and range of every argument, before anything is read or written."""
    from qgplm.export.format.manifest import empty_out_dir

    if (args["ckpt"] is None) == (args["model"] is None):
        raise QgplmError(f"pass exactly one of ckpt=<run dir or .ckpt> or model=<saved HF model dir>: usage: {USAGE}")
    for key in ("ckpt", "model"):
        if args[key] is not None and (not args[key].strip() or "\0" in args[key]):
            raise QgplmError(f"{key}={args[key]!r} is not a path: pass {key}=<dir>")
    choice("format", args["format"], FORMATS)
    choice("kind", args["kind"], KINDS)
    _bits("weight_bits", args["weight_bits"])
    _bits("embedding_bits", args["embedding_bits"])
    if args["position_bits"] not in (None, 8):
        raise QgplmError(f"position_bits={args['position_bits']} is not valid: use 8 or null (FP32)")
    if args["block_size"] is not None:
        if args["format"] != "onnx":
            raise QgplmError(f"block_size= only applies to format=onnx (got format={args['format']})")
        if args["block_size"] < 16 or args["block_size"] & (args["block_size"] - 1):
            raise QgplmError(f"block_size={args['block_size']} is not valid: use a power of 2 >= 16 "
                             f"(64 is the fast default)")
    if args["gguf_2bit"] is not None:
        if args["format"] != "gguf":
            raise QgplmError(f"gguf_2bit= only applies to format=gguf (got format={args['format']})")
        choice("gguf_2bit", args["gguf_2bit"], TWO_BIT)
    if not args["out"].strip():
        raise QgplmError("out= is empty: pass out=<a new directory>")
    empty_out_dir(args["out"])  # a file, a non-empty or unwritable dir: refused before any work


def main(argv: list[str]) -> int:
    args = parse_kv(argv, SPEC, USAGE)
    check_args(args)
    from qgplm.export.format.writer import export_model

    if args["ckpt"] is not None:
        from qgplm.train.student import load_student

        model, tokenizer = load_student(args["ckpt"])
    else:
        from qgplm.models import load_pretrained, load_tokenizer

        model = load_pretrained(args["model"], args["kind"], key="model")
        tokenizer = load_tokenizer(args["model"], key="model")
    options = dict(weight_bits=args["weight_bits"], embedding_bits=args["embedding_bits"],
                   quantizer=args["quantizer"], position_bits=args["position_bits"], fp16=args["fp16"])
    if args["format"] == "onnx":
        from qgplm.export.converters.onnx import DEFAULT_BLOCK, export_onnx

        report = export_onnx(model, args["out"], tokenizer, block_size=args["block_size"] or DEFAULT_BLOCK,
                             **options)
    elif args["format"] == "gguf":
        from qgplm.export.converters.gguf import DEFAULT_TWO_BIT, export_gguf

        report = export_gguf(model, args["out"], tokenizer, gguf_2bit=args["gguf_2bit"] or DEFAULT_TWO_BIT, **options)
    else:
        report = export_model(model, args["out"], tokenizer, **options)
    print(f"exported to {report.out_dir}")
    print(report.table())
    return 0


if __name__ == "__main__":
    run_main(main)
