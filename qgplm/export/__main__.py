"""`python -m qgplm.export ckpt=<run dir or .ckpt> out=<dir> [position_bits=8] [fp16=true] [format=onnx|gguf]`

Writes the trained student of a run as a packed export (see qgplm.export) and prints its size
breakdown. `model=<saved HF model dir>` instead of ckpt= quantizes a float model post-training
(weight_bits=, embedding_bits=, quantizer= choose how). `format=onnx` writes a standalone ONNX
model instead (export/onnx.py: GPT-2 and BART; block_size= of its MatMulNBits layers), `format=gguf`
a llama.cpp GGUF file (export/gguf.py: GPT-2, Llama, Mistral, Qwen2; 2-bit codes as TQ2_0, or where a
row is not a multiple of 256 long as Q2_0 or Q4_0, `gguf_2bit=q2_0|q4_0`).
"""

from __future__ import annotations

from qgplm.errors import QgplmError
from qgplm.export.cli import parse_kv, run_main

USAGE = ("python -m qgplm.export ckpt=<run dir or .ckpt> out=<dir> [position_bits=8] [fp16=true] "
         "[format=qgplm|onnx|gguf] [gguf_2bit=q2_0|q4_0]")
FORMATS = ("qgplm", "onnx", "gguf")
SPEC = {"ckpt": (str, None), "model": (str, None), "kind": (str, "causal"), "out": (str, ...),
        "weight_bits": ("opt_int", 2), "embedding_bits": ("opt_int", 2), "quantizer": (str, "quantgpt"),
        "position_bits": ("opt_int", None), "fp16": (bool, False), "format": (str, "qgplm"),
        "block_size": ("opt_int", None), "gguf_2bit": (str, None)}


def main(argv: list[str]) -> int:
    args = parse_kv(argv, SPEC, USAGE)
    from qgplm.export.exporter import export_model

    if (args["ckpt"] is None) == (args["model"] is None):
        raise QgplmError(f"pass exactly one of ckpt=<run dir or .ckpt> or model=<saved HF model dir>: usage: {USAGE}")
    if args["format"] not in FORMATS:
        raise QgplmError(f"format={args['format']!r} is not valid: choose one of {', '.join(FORMATS)}")
    if args["block_size"] is not None and args["format"] != "onnx":
        raise QgplmError("block_size= only applies to format=onnx")
    if args["gguf_2bit"] is not None and args["format"] != "gguf":
        raise QgplmError("gguf_2bit= only applies to format=gguf")
    if args["ckpt"] is not None:
        from qgplm.export.checkpoint import load_student

        model, tokenizer = load_student(args["ckpt"])
    else:
        from qgplm.models import load_pretrained, load_tokenizer

        model = load_pretrained(args["model"], args["kind"], key="model")
        tokenizer = load_tokenizer(args["model"], key="model")
    options = dict(weight_bits=args["weight_bits"], embedding_bits=args["embedding_bits"],
                   quantizer=args["quantizer"], position_bits=args["position_bits"], fp16=args["fp16"])
    if args["format"] == "onnx":
        from qgplm.export.onnx import DEFAULT_BLOCK, export_onnx

        report = export_onnx(model, args["out"], tokenizer, block_size=args["block_size"] or DEFAULT_BLOCK,
                             **options)
    elif args["format"] == "gguf":
        from qgplm.export.gguf import DEFAULT_TWO_BIT, export_gguf

        report = export_gguf(model, args["out"], tokenizer, gguf_2bit=args["gguf_2bit"] or DEFAULT_TWO_BIT, **options)
    else:
        report = export_model(model, args["out"], tokenizer, **options)
    print(f"exported to {report.out_dir}")
    print(report.table())
    return 0


if __name__ == "__main__":
    run_main(main)
