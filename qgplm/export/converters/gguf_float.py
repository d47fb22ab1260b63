"""A float (F16 or F32) GGUF file of an unquantized HF model: the starting point of llama.cpp's own
post-training quantization (`llama_model_quantize`), written with the same layout, hyper-parameters
and tokenizer as format=gguf's quantized files (gguf_arch.py, gguf_vocab.py), so that a qgplm
student and llama.cpp's quantization of its teacher are read by llama.cpp the same way.

As llama.cpp's convert_hf_to_gguf.py does: matrices in the chosen type, 1-D tensors (norms,
biases) in F32, attn_q / attn_k rows permuted for llama.cpp's RoPE, a tied LM head not written
(llama.cpp reads the token embedding as its output matrix).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from qgplm.errors import QgplmError
from qgplm.export.converters.gguf_arch import arch_of
from qgplm.export.converters.gguf_vocab import add_tokenizer

FLOAT_TYPES = {"f16": (np.float16, 1), "f32": (np.float32, 0)}  # numpy type, llama.h's LLAMA_FTYPE_*


def float_tensors(model: Any, dtype: str = "f16") -> list[tuple[str, np.ndarray]]:
    """(GGUF name, array) of every tensor llama.cpp's graph reads, in the file's layout."""
    if dtype not in FLOAT_TYPES:
        raise QgplmError(f"dtype={dtype!r} is not valid: choose one of {', '.join(FLOAT_TYPES)}")
    config = model.config
    arch, _ = arch_of(type(model).__name__, config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out: list[tuple[str, np.ndarray]] = []
    for key, t in model.state_dict().items():
        name = arch.gguf_name(key)
        if name is None:
            if arch.ignored and key.endswith(arch.ignored) or key.endswith("rotary_emb.inv_freq"):
                continue
            raise QgplmError(f"{key} has no place in llama.cpp's {arch.arch} graph")
        if name == "output.weight" and tied:
            continue
        t = t.detach().float()
        order = arch.row_order(name, t.shape[0], config)
        if order is not None:
            t = t[order]
        out.append((name, t.numpy().astype(FLOAT_TYPES[dtype][0] if t.dim() >= 2 else np.float32)))
    return out


def export_gguf_float(model: Any, out_file: str | Path, tokenizer: Any, dtype: str = "f16",
                      name: str | None = None) -> Path:
    """Write `out_file` (a .gguf) of `model` (a HF Llama / Mistral / Qwen2 / GPT-2 causal LM) with
    `tokenizer` (a byte-level BPE HF tokenizer, or None: ids only) in float `dtype` ("f16" or "f32")."""
    import gguf

    arrays = float_tensors(model, dtype)
    config = model.config
    arch, _ = arch_of(type(model).__name__, config)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), arch.arch)
    writer.add_name(name or out.stem)
    writer.add_file_type(FLOAT_TYPES[dtype][1])
    arch.hparams(writer, gguf, config)
    with tempfile.TemporaryDirectory(prefix="qgplm-tok-") as tok_dir:
        if tokenizer is not None:  # without one the file holds ids only (tokenizer model "none")
            tokenizer.save_pretrained(tok_dir)
            config.save_pretrained(tok_dir)
        add_tokenizer(writer, gguf, tokenizer, Path(tok_dir), config.vocab_size)
    for tname, array in arrays:
        writer.add_tensor(tname, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


__all__ = ["FLOAT_TYPES", "export_gguf_float", "float_tensors"]
