"""On-disk size of `format=onnx` exports of full-size, randomly initialised GPT-2 small and BART-base.

    PYTHONPATH=. python experiments/size_onnx.py [--models gpt2 bart] [--compact]

For each model: the FP32 `save_pretrained` safetensors file, the packed qgplm export and the ONNX
export (model.onnx + model.onnx.data) at W2E2 (post-training quantized with gamma_init=fixed, as
experiments/size_export.py: sizes do not depend on the scales), the uint8 (packed codes) and
float bytes among the ONNX initializers, and a check that onnxruntime loads the file and runs it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from size_export import MIB, build, save_fp32

from qgplm.export import export_model
from qgplm.export.converters.onnx import DATA_FILE, ONNX_FILE, PAST_FILE, export_onnx
from qgplm.quant import QuantConfig


def initializer_bytes(path: Path) -> dict[str, int]:
    import onnx

    out: dict[str, int] = {}
    for t in onnx.load(str(path), load_external_data=False).graph.initializer:
        length = next((int(e.value) for e in t.external_data if e.key == "length"), len(t.raw_data))
        kind = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
        out[kind] = out.get(kind, 0) + length
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["gpt2", "bart"])
    ap.add_argument("--compact", action="store_true", help="also position_bits=8 fp16=true")
    args = ap.parse_args()
    qc = QuantConfig(weight_bits=2, embedding_bits=2, quantizer_kwargs={"gamma_init": "fixed"})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = build(name).eval()
            fp32 = save_fp32(model, Path(tmp) / f"{name}-fp32")
            for compact in (False, True) if args.compact else (False,):
                opts = {"position_bits": 8, "fp16": True} if compact else {}
                packed = export_model(model, Path(tmp) / f"{name}-{compact}-packed", quant_config=qc, **opts)
                t = time.perf_counter()
                rep = export_onnx(Path(tmp) / f"{name}-{compact}-packed", Path(tmp) / f"{name}-{compact}-onnx")
                took = time.perf_counter() - t
                kinds = initializer_bytes(Path(rep.out_dir) / ONNX_FILE)
                import onnxruntime as ort

                sess = ort.InferenceSession(str(Path(rep.out_dir) / ONNX_FILE), providers=["CPUExecutionProvider"])
                ids = np.arange(8, dtype=np.int64)[None] + 100
                feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
                if name == "bart":
                    feed["decoder_input_ids"] = ids[:, :4]
                shape = sess.run(["logits"], feed)[0].shape
                del sess
                tag = "W2E2" + (" compact" if compact else "")
                print(f"== {name} {tag}: export {took:.1f} s, logits {shape}\n{rep.table()}\n"
                      f"   initializers by dtype (MiB): { {k: round(v / MIB, 2) for k, v in kinds.items()} }")
                graphs = rep.files[ONNX_FILE] + rep.files.get(PAST_FILE, 0)  # with the KV-cache graph
                rows.append((name, tag, fp32 / MIB, packed.file_bytes / MIB, graphs / MIB,
                             rep.files.get(DATA_FILE, 0) / MIB, kinds.get("uint8", 0) / MIB,
                             sum(v for k, v in kinds.items() if k.startswith("float")) / MIB,
                             rep.file_bytes / MIB, fp32 / rep.file_bytes))
            del model
    print("\n| model | export | FP32 file MiB | qgplm packed MiB | model.onnx MiB | model.onnx.data MiB "
          "| uint8 codes MiB | float tensors MiB | ONNX total MiB | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | " + " | ".join(f"{v:.2f}" for v in r[2:-1]) + f" | {r[-1]:.2f}x |")


if __name__ == "__main__":
    main()
