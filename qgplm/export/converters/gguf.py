"""`format=gguf`: a GGUF file of a qgplm export that llama.cpp runs without qgplm.

    <out>/model.gguf        weights, hyper-parameters and the BPE tokenizer (GGUF v3)
    <out>/config.json, generation_config.json, tokenizer files   as in the packed export

Architectures (gguf_arch.py, laid out as llama.cpp's own converter does): GPT-2 (arch "gpt2"),
Llama and Mistral (arch "llama", attn_q / attn_k rows permuted for llama.cpp's RoPE on pairs),
Qwen2 (arch "qwen2", with its q/k/v biases). BART has no llama.cpp graph: it deploys through
onnxruntime only.

Why llama.cpp next to onnxruntime (docs/deploy.md has the measurements): its
TQ2_0 type stores 2-bit codes at 2.06 bits per weight and its CPU kernel computes on that layout
directly, so what is resident in RAM is the file; onnxruntime's MatMulNBits repacks 2-bit weights
to about 3 bits per weight.

Mapping of the student's codes (ggml_blocks.py; no re-quantization, the only rounding is the
step's, to fp16): 2-bit codes as TQ2_0 where a row is a multiple of 256 long, else as Q2_0
(`gguf_2bit=q2_0`, 2.25 bits, rows a multiple of 64) or Q4_0 (`gguf_2bit=q4_0`, 4.5 bits);
3-, 4-bit as Q4_0, 5- to 8-bit as Q8_0. Rows must be a multiple of 32 long. The step is per tensor
or per row, the same in every block of a row, so every weight of the file dequantizes to
codes * fp16(step) exactly; the export report gives the largest relative rounding of a step to
fp16 and the file's bits per weight.

Tensors that are not quantized (RMSNorm / LayerNorm weights, biases, position embeddings) are
stored in fp32 (or as exported: 8-bit position embeddings become Q8_0). A tied LM head is not
written: llama.cpp reads the token embedding as its output matrix, so one copy of the table is
resident; an untied head is `output.weight`.

Activations: llama.cpp quantizes each row of a layer's input to 8 bits per block (Q8_K, 256 per
block, for TQ2_0; Q8_0, 32 per block, otherwise), symmetric with its own scale, not with the
student's per-tensor min-max. Attention (scores, softmax, the KV cache) runs in llama.cpp's own
precision (fp32 / fp16 cache), so a `quantize_attention` student's attention fake quantization is
not applied. `experiments/bench_lowbit_quality.py` measures what that costs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from qgplm.errors import QgplmError, optional_module
from qgplm.export.converters.ggml_blocks import (
    BLOCKS,
    DEFAULT_TWO_BIT,
    ENCODERS,
    GGML_TYPE_IDS,
    TWO_BIT,
    encode_q2_0,
    encode_q4_0,
    encode_q8_0,
    encode_tq2_0,
    ggml_type,
)
from qgplm.export.converters.gguf_arch import SUPPORTED, GGUFArch, arch_of
from qgplm.export.converters.gguf_vocab import add_tokenizer
from qgplm.export.converters.via_packed import via_packed_export
from qgplm.export.format.manifest import MANIFEST, WEIGHTS, empty_out_dir, read_manifest, verify_checksums
from qgplm.export.format.pack import row_steps
from qgplm.export.format.report import ExportReport
from qgplm.export.runtimes.llamacpp import GGUF_FILE

FILE_TYPES = {"F32": 0, "Q4_0": 2, "Q8_0": 7, "TQ2_0": 37, "Q2_0": 41}  # llama.h's LLAMA_FTYPE_MOSTLY_*


def _gguf():
    return optional_module("gguf", "format=gguf", "use format=onnx")


def check_supported(model_class: str, config: Any = None) -> None:
    """One line naming the architectures format=gguf writes, for anything else (or an unsupported variant)."""
    arch_of(model_class, config)


# ---------------------------------------------------------------- export


def _file_name(arch: GGUFArch, key: str, aliases: list[str]) -> str | None:
    """The GGUF name of a stored tensor (None: a buffer llama.cpp builds itself); a tied head is
    stored once, as the embedding, which llama.cpp reads as its output matrix too."""
    names = [n for n in map(arch.gguf_name, aliases) if n is not None]
    if not names:
        if arch.ignored and all(a.endswith(arch.ignored) for a in aliases):
            return None
        raise QgplmError(f"{key} has no place in llama.cpp's {arch.arch} graph: use format=onnx or mode=lowbit")
    return "token_embd.weight" if "token_embd.weight" in names else names[0]


def _quantized(codes: Tensor, step: Tensor, key: str, bits: int, order: Tensor | None, two_bit: str,
               report: ExportReport) -> tuple[np.ndarray, str]:
    """(blocks, GGML type) of one packed tensor, its rows in the file's order."""
    steps = row_steps(step, codes.shape[0])
    if order is not None:
        codes, steps = codes[order], steps[order]
    qtype, why = ggml_type(bits, codes.shape[1], key, two_bit)
    if why:
        report.held_as.setdefault(why, []).append(key)
    report.max_step_rounding = max(report.max_step_rounding, float(
        ((steps.half().float() - steps).abs() / steps.abs().clamp_min(1e-30)).max()))
    return ENCODERS[qtype](codes, steps), qtype


def _file_tensors(manifest: dict[str, Any], tensors: dict[str, Tensor], arch: GGUFArch, config: Any,
                  two_bit: str, report: ExportReport) -> list[tuple[str, np.ndarray, str]]:
    """(GGUF name, array, GGML type) of every tensor llama.cpp's graph reads, each stored tensor once."""
    from qgplm.export.loader import decode

    out: list[tuple[str, np.ndarray, str]] = []
    for kind in ("packed", "fp"):
        for key, entry in manifest[kind].items():
            name = _file_name(arch, key, entry["aliases"])
            if name is None:
                continue
            if kind == "fp":
                t = tensors[key].float()
                order = arch.row_order(name, t.shape[0], config)
                out.append((name, (t if order is None else t[order]).numpy(), "F32"))
                continue
            codes, step = decode(tensors, key, entry)
            order = arch.row_order(name, codes.shape[0], config)
            out.append((name, *_quantized(codes, step, key, entry["bits"], order, two_bit, report)))
    return out


def _add_tensor(writer: Any, name: str, array: np.ndarray, qtype: str, report: ExportReport) -> None:
    if qtype == "F32":
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        report.weights += array.size
    else:
        block, nbytes = BLOCKS[qtype]
        shape = (array.shape[0], array.shape[1] // nbytes * block)
        # the shape in weights and the type as ggml's number: gguf's writer converts only uint8 byte
        # shapes (with its own type table, which has no Q2_0), so the blocks go in as int8 bytes
        writer.add_tensor(name, array.view(np.int8), raw_shape=shape, raw_dtype=GGML_TYPE_IDS[qtype])
        report.weights += shape[0] * shape[1]
        report.quant_weights += shape[0] * shape[1]
        report.quant_bytes += array.nbytes
    report.types[name] = qtype


def _file_type(arrays: list[tuple[str, np.ndarray, str]]) -> int:
    """general.file_type: the quantized type holding the most bytes (ALL_F32 if none)."""
    held: dict[str, int] = {}
    for _, array, qtype in arrays:
        if qtype != "F32":
            held[qtype] = held.get(qtype, 0) + array.nbytes
    return FILE_TYPES[max(held, key=held.get)] if held else FILE_TYPES["F32"]


def export_gguf(source: Any, out_dir: str | Path, tokenizer: Any = None, gguf_2bit: str = DEFAULT_TWO_BIT,
                **export_kwargs: Any) -> ExportReport:
    """Write `<out_dir>/model.gguf` of `source`: a qgplm export directory, or a model (a trained
    student, or a float model quantized post-training with `export_kwargs` as in `export_model`),
    exported to the packed format first in a temporary directory. `gguf_2bit`: how 2-bit rows that
    are not a multiple of 256 long are held, "q2_0" (2.25 bits) or "q4_0" (4.5 bits); both exact."""
    _gguf()
    if gguf_2bit not in TWO_BIT:
        raise QgplmError(f"gguf_2bit={gguf_2bit!r} is not valid: choose one of {', '.join(TWO_BIT)}")
    out = empty_out_dir(out_dir)
    return via_packed_export(source, tokenizer, export_kwargs, lambda m: check_supported(type(m).__name__, m.config),
                             lambda d: _from_dir(d, out, gguf_2bit), "qgplm-gguf-")


def _add_metadata(writer: Any, gguf: Any, arch: GGUFArch, config: Any, export_dir: Path, manifest: dict[str, Any],
                  arrays: list[tuple[str, np.ndarray, str]]) -> None:
    from qgplm.export.loader import load_export_tokenizer

    writer.add_name(Path(export_dir).name)
    writer.add_file_type(_file_type(arrays))
    arch.hparams(writer, gguf, config)
    add_tokenizer(writer, gguf, load_export_tokenizer(export_dir), export_dir, config.vocab_size)
    writer.add_string("qgplm.bits", json.dumps(manifest["bits"]))
    writer.add_string("qgplm.quantizer", ",".join(manifest["quantizer"]))


def _from_dir(export_dir: Path, out: Path, two_bit: str = DEFAULT_TWO_BIT) -> ExportReport:
    gguf = _gguf()
    from transformers import AutoConfig

    from qgplm.export.loader import read_tensors

    export_dir, manifest = read_manifest(export_dir)
    config = AutoConfig.from_pretrained(export_dir, local_files_only=True, trust_remote_code=False)
    arch, notes = arch_of(manifest["model_class"], config)
    verify_checksums(export_dir, manifest)
    if manifest.get("attention_act"):
        notes.append("attention fake quantization (quantize_attention) is not applied: llama.cpp runs attention in "
                     "fp32/fp16")
    report = ExportReport(str(out), "gguf", {}, manifest["size"]["fp32_bytes"], max_step_rounding=0.0,
                          notes=notes)
    arrays = _file_tensors(manifest, read_tensors(export_dir), arch, config, two_bit, report)
    out.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out / GGUF_FILE), arch.arch)
    _add_metadata(writer, gguf, arch, config, export_dir, manifest, arrays)
    for name, array, qtype in arrays:
        _add_tensor(writer, name, array, qtype, report)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for f in sorted(export_dir.iterdir()):  # config, generation config, tokenizer
        if f.is_file() and f.name not in (WEIGHTS, MANIFEST):
            shutil.copy2(f, out / f.name)
    report.files[GGUF_FILE] = (out / GGUF_FILE).stat().st_size
    return report


__all__ = ["DEFAULT_TWO_BIT", "GGUF_FILE", "SUPPORTED", "TWO_BIT", "check_supported", "encode_q2_0",
           "encode_q4_0", "encode_q8_0", "encode_tq2_0", "export_gguf", "ggml_type"]
