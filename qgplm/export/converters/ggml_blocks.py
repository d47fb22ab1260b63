"""llama.cpp's quantized blocks filled with a student's integer codes, exactly (no re-quantization).

Every block holds one fp16 scale `d` and small unsigned values `q`; each type dequantizes to an
affine function of q, which the codes c of one quantizer step map onto exactly:
    TQ2_0  256 a block, 66 bytes (2.06 bits): qs[64] then d; (q - 1) * d
    Q2_0    64 a block, 18 bytes (2.25 bits): d then qs[16];  (q - 1) * d
    Q4_0    32 a block, 18 bytes (4.5 bits):  d then qs[16];  (q - 8) * d
    Q8_0    32 a block, 34 bytes (8.5 bits):  d then int8 qs[32]; q * d
2-bit ternary codes {-1, 0, 1} are q = c + 1 with d = step; the full 2-bit grid {-2..1} is
q = 1 - c with d = -step ((1 - c - 1) * -step = c * step), since q - 1 spans {-1..2}. The step is
per tensor or per row, so every block of a row has the same d: the one rounding is the step's, to
fp16. Q2_0 is llama.cpp's own type (ggml type 42, `dequantize_row_q2_0`); the gguf Python package
does not know it yet, so its blocks are written here and its type id is given as a number.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from qgplm.errors import QgplmError
from qgplm.export.format.pack import row_steps

# ggml type ids (ggml.h) and block geometry (weights, bytes) of the types written here
GGML_TYPE_IDS = {"F32": 0, "Q4_0": 2, "Q8_0": 8, "TQ2_0": 35, "Q2_0": 42}
BLOCKS = {"TQ2_0": (256, 66), "Q2_0": (64, 18), "Q4_0": (32, 18), "Q8_0": (32, 34)}
TWO_BIT = ("q2_0", "q4_0")  # how 2-bit rows that are not a multiple of 256 long are held
DEFAULT_TWO_BIT = "q2_0"


def _rows_step(step: Tensor, n: int) -> np.ndarray:
    """fp16 [N] from a per-tensor or per-row step."""
    s = row_steps(step, n)
    if not bool(torch.isfinite(s).all()) or float(s.abs().max()) > 65504:
        raise QgplmError("a quantizer step does not fit fp16 (GGUF's block scale): use format=onnx (fp32 scales)")
    return s.numpy().astype(np.float16)


def _scales(d: np.ndarray, blocks: int) -> np.ndarray:
    """uint8 [N, blocks, 2]: each row's fp16 scale repeated in every block of the row."""
    return np.repeat(d.view(np.uint8).reshape(-1, 1, 2), blocks, axis=1)


def _two_bit(codes: Tensor, step: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(q uint8 [N, K] in 0..3, fp16 d [N]) with (q - 1) * d = codes * fp16(step)."""
    c = codes.to(torch.int16)
    if int(c.min()) < -2 or int(c.max()) > 1:
        raise QgplmError("codes out of the 2-bit range: the export is corrupt, export it again")
    d = _rows_step(step, codes.shape[0])
    if int(c.min()) < -1:  # the full grid: stored negated
        return (1 - c).to(torch.uint8).numpy(), -d
    return (c + 1).to(torch.uint8).numpy(), d


def encode_tq2_0(codes: Tensor, step: Tensor) -> np.ndarray:
    """TQ2_0 rows: uint8 [N, K / 256 * 66] from 2-bit signed codes [N, K] (K % 256 == 0).

    Value v = c*128 + l*32 + m of a block sits in bits 2l..2l+1 of byte c*32 + m (ggml's
    dequantize_row_tq2_0)."""
    n, k = codes.shape
    q, d = _two_bit(codes, step)
    q = q.reshape(n, k // 256, 2, 4, 32)
    qs = q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)  # [N, B, 2, 32]
    return np.concatenate([qs.reshape(n, k // 256, 64), _scales(d, k // 256)], axis=-1).reshape(n, -1)


def encode_q2_0(codes: Tensor, step: Tensor) -> np.ndarray:
    """Q2_0 rows: uint8 [N, K / 64 * 18] from 2-bit signed codes [N, K] (K % 64 == 0).

    Value j of a block sits in bits 2(j % 4)..2(j % 4)+1 of byte j // 4 (ggml's dequantize_row_q2_0)."""
    n, k = codes.shape
    q, d = _two_bit(codes, step)
    q = q.reshape(n, k // 64, 16, 4)
    qs = q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)
    return np.concatenate([_scales(d, k // 64), qs], axis=-1).reshape(n, -1)


def encode_q4_0(codes: Tensor, step: Tensor) -> np.ndarray:
    """Q4_0 rows: uint8 [N, K / 32 * 18] from codes in [-8, 7] (K % 32 == 0).

    Value j < 16 of a block is the low nibble of qs[j], value j >= 16 the high nibble of qs[j - 16]."""
    n, k = codes.shape
    u = codes.to(torch.int16) + 8
    if int(u.min()) < 0 or int(u.max()) > 15:
        raise QgplmError("codes out of the 4-bit range: the export is corrupt, export it again")
    u = u.to(torch.uint8).numpy().reshape(n, k // 32, 2, 16)
    qs = u[:, :, 0] | (u[:, :, 1] << 4)
    return np.concatenate([_scales(_rows_step(step, n), k // 32), qs], axis=-1).reshape(n, -1)


def encode_q8_0(codes: Tensor, step: Tensor) -> np.ndarray:
    """Q8_0 rows: uint8 [N, K / 32 * 34] from codes in [-128, 127]: d (fp16), then int8 qs[32]."""
    n, k = codes.shape
    if int(codes.min()) < -128 or int(codes.max()) > 127:
        raise QgplmError("codes out of the 8-bit range: the export is corrupt, export it again")
    qs = codes.to(torch.int8).numpy().reshape(n, k // 32, 32).view(np.uint8)
    return np.concatenate([_scales(_rows_step(step, n), k // 32), qs], axis=-1).reshape(n, -1)


ENCODERS = {"TQ2_0": encode_tq2_0, "Q2_0": encode_q2_0, "Q4_0": encode_q4_0, "Q8_0": encode_q8_0}


def _two_bit_type(k: int, two_bit: str) -> tuple[str, str]:
    if two_bit not in TWO_BIT:
        raise QgplmError(f"gguf_2bit={two_bit!r} is not valid: choose one of {', '.join(TWO_BIT)}")
    why = f"rows of {k} are not a multiple of 256 (TQ2_0's block)"
    if two_bit == "q2_0" and k % 64 == 0:
        return "Q2_0", f"{why}: Q2_0 (2.25 bits)"
    if two_bit == "q2_0":
        return "Q4_0", f"{why} nor of 64 (Q2_0's): held as 4-bit"
    return "Q4_0", f"{why}: held as 4-bit (gguf_2bit=q4_0)"


def ggml_type(bits: int, k: int, name: str, two_bit: str = DEFAULT_TWO_BIT) -> tuple[str, str]:
    """(GGML type name, why) that holds `bits`-bit codes of rows `k` long exactly; 2-bit rows that
    are not a multiple of 256 long go to Q2_0 or Q4_0 as `two_bit` says."""
    if bits <= 2 and k % 256 == 0:
        return "TQ2_0", ""
    if k % 32:
        raise QgplmError(f"{name}: rows of {k} weights cannot be stored in GGUF's quantized blocks (a multiple of "
                         f"32 is needed, 256 for 2-bit TQ2_0): use format=onnx")
    if bits <= 2:
        return _two_bit_type(k, two_bit)
    if bits <= 4:
        return "Q4_0", "" if bits == 4 else "3-bit codes held as 4-bit"
    if bits <= 8:
        return "Q8_0", "" if bits == 8 else f"{bits}-bit codes held as 8-bit"
    raise QgplmError(f"{name}: {bits}-bit codes do not fit GGUF's quantized types (2..8 bits)")


__all__ = ["BLOCKS", "DEFAULT_TWO_BIT", "ENCODERS", "GGML_TYPE_IDS", "TWO_BIT", "encode_q2_0", "encode_q4_0",
           "encode_q8_0", "encode_tq2_0", "ggml_type"]
