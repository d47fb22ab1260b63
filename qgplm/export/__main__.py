"""`python -m qgplm.export ckpt=<run dir or .ckpt> out=<dir> [position_bits=8] [fp16=true]`

Writes the trained student of a run as a packed export (see qgplm.export) and prints its size
breakdown. `model=<saved HF model dir>` instead of ckpt= quantizes a float model post-training
(weight_bits=, embedding_bits=, quantizer= choose how).
"""

from __future__ import annotations

from qgplm.errors import QgplmError
from qgplm.export.cli import parse_kv, run_main

USAGE = "python -m qgplm.export ckpt=<run dir or .ckpt> out=<dir> [position_bits=8] [fp16=true]"
SPEC = {"ckpt": (str, None), "model": (str, None), "kind": (str, "causal"), "out": (str, ...),
        "weight_bits": ("opt_int", 2), "embedding_bits": ("opt_int", 2), "quantizer": (str, "quantgpt"),
        "position_bits": ("opt_int", None), "fp16": (bool, False)}


def main(argv: list[str]) -> int:
    args = parse_kv(argv, SPEC, USAGE)
    from qgplm.export.exporter import export_model

    if (args["ckpt"] is None) == (args["model"] is None):
        raise QgplmError(f"pass exactly one of ckpt=<run dir or .ckpt> or model=<saved HF model dir>: usage: {USAGE}")
    if args["ckpt"] is not None:
        from qgplm.export.checkpoint import load_student

        model, tokenizer = load_student(args["ckpt"])
    else:
        from qgplm.models import load_pretrained, load_tokenizer

        model = load_pretrained(args["model"], args["kind"], key="model")
        tokenizer = load_tokenizer(args["model"], key="model")
    report = export_model(model, args["out"], tokenizer, weight_bits=args["weight_bits"],
                          embedding_bits=args["embedding_bits"], quantizer=args["quantizer"],
                          position_bits=args["position_bits"], fp16=args["fp16"])
    print(f"exported to {report.out_dir}")
    print(report.table())
    return 0


if __name__ == "__main__":
    run_main(main)
