"""llama.cpp's own reading of a GGUF file, through ctypes on the ggml library that llama-cpp-python
ships: gguf_init_from_file for the tensor table, and each type's ggml to_float (dequantize_row_*)
for the values. The reference for the exactness tests of format=gguf, independent of qgplm's
writer and of the gguf Python package (which does not know every type llama.cpp has, e.g. Q2_0)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


class _TypeTraits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


def ggml_lib() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _InitParams]
    for fn, res in (("gguf_get_n_tensors", ctypes.c_int64), ("gguf_get_data_offset", ctypes.c_size_t)):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, [ctypes.c_void_p]
    for fn, res in (("gguf_get_tensor_name", ctypes.c_char_p), ("gguf_get_tensor_type", ctypes.c_int),
                    ("gguf_get_tensor_offset", ctypes.c_size_t), ("gguf_get_tensor_size", ctypes.c_size_t),
                    ("gguf_get_tensor_ne", ctypes.POINTER(ctypes.c_int64))):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.dequantize_row_q2_0.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def read_gguf(path: str | Path) -> dict[str, tuple[str, np.ndarray]]:
    """{tensor name: (ggml type name, float32 values [rows, row length], or [n] for one row)}, each
    dequantized by ggml's to_float of its type."""
    lib = ggml_lib()
    ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    assert ctx, f"llama.cpp cannot read {path}"
    data = Path(path).read_bytes()
    out = {}
    try:
        base = lib.gguf_get_data_offset(ctx)
        for i in range(lib.gguf_get_n_tensors(ctx)):
            ne = lib.gguf_get_tensor_ne(ctx, i)
            numel = ne[0] * ne[1] * ne[2] * ne[3]
            shape = (ne[0],) if numel == ne[0] else (numel // ne[0], ne[0])
            start = base + lib.gguf_get_tensor_offset(ctx, i)
            raw = data[start:start + lib.gguf_get_tensor_size(ctx, i)]
            traits = lib.ggml_get_type_traits(lib.gguf_get_tensor_type(ctx, i)).contents
            values = np.zeros(numel, dtype=np.float32)
            if traits.to_float:
                src = ctypes.create_string_buffer(raw, len(raw))
                _TO_FLOAT(traits.to_float)(ctypes.cast(src, ctypes.c_void_p),
                                           values.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), numel)
            else:  # F32
                values[:] = np.frombuffer(raw, dtype=np.float32)
            name = lib.gguf_get_tensor_name(ctx, i).decode()
            out[name] = (traits.type_name.decode().upper(), values.reshape(shape))
    finally:
        lib.gguf_free(ctx)
    return out
