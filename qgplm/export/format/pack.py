"""Dense bit packing of signed integer codes (2..8 bits) into bytes.

A b-bit code c in [-2^(b-1), 2^(b-1) - 1] is stored as the unsigned value c + 2^(b-1). Codes are
laid out as one little-endian bit stream: element i occupies bits [i*b, (i+1)*b) of the stream,
least significant bit first, and byte k holds stream bits [8k, 8k+8). So 2-bit codes fill a byte
four at a time (first code in the low bits), 4-bit codes two at a time, 8-bit codes one per byte,
and 3-bit codes straddle byte boundaries; the last byte is zero-padded. numel * b / 8 bytes,
rounded up: this is what makes the on-disk size match the paper's accounting.

QuantGPT's symmetric codes use [-n, n] with n = 2^(b-1) - 1 (ternary at 2 bits); LSQ's use the
full [-2^(b-1), 2^(b-1) - 1]; both fit.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from qgplm.errors import QgplmError

PACKABLE_BITS = tuple(range(2, 9))
_CHUNK = 1 << 20  # bytes unpacked per step: bounds the temporaries of unpacking a large table


def row_steps(step: Tensor, n: int) -> Tensor:
    """fp32 [N]: a quantizer's step (one per tensor, or one per row) as one value per row of N."""
    s = step.reshape(-1).float()
    return s.expand(n) if s.numel() == 1 else s


def code_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise QgplmError(f"cannot pack {bits}-bit codes: bit-widths 2..8 are supported")


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Flatten integer-valued `codes` (any dtype) and pack them densely; returns a uint8 tensor."""
    _check_bits(bits)
    lo, hi = code_range(bits)
    flat = codes.detach().reshape(-1)
    if flat.numel() and (flat.min() < lo or flat.max() > hi):
        raise QgplmError(f"codes outside the {bits}-bit range [{lo}, {hi}]: the quantizer's codes() is inconsistent")
    u = (flat.to(torch.int16) - lo).to(torch.uint8)  # unsigned, in [0, 2^b)
    if 8 % bits == 0:  # 2, 4, 8 bits: whole codes per byte
        per = 8 // bits
        pad = (-u.numel()) % per
        if pad:
            u = torch.cat([u, u.new_zeros(pad)])
        u = u.view(-1, per)
        out = torch.zeros(u.shape[0], dtype=torch.uint8)
        for j in range(per):
            out |= u[:, j] << (j * bits)
        return out
    # general case (3, 5, 6, 7 bits): expand to a bit stream, then regroup by 8
    shifts = torch.arange(bits, dtype=torch.uint8)
    stream = ((u.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    stream = stream.view(-1, 8)
    out = torch.zeros(stream.shape[0], dtype=torch.uint8)
    for j in range(8):
        out |= stream[:, j] << j
    return out


@functools.cache
def _byte_table(bits: int) -> Tensor:
    """[256, 8 // bits] int8: the codes packed in each possible byte (2, 4 and 8 bits)."""
    lo, _ = code_range(bits)
    byte = torch.arange(256, dtype=torch.int16).unsqueeze(1)
    shifts = torch.arange(0, 8, bits, dtype=torch.int16)
    return (((byte >> shifts) & ((1 << bits) - 1)) + lo).to(torch.int8)


def _check_packed(packed: Tensor, bits: int, numel: int) -> None:
    """One error line unless `packed` is the uint8 stream of `numel` `bits`-bit codes."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_nbytes(numel, bits):
        raise QgplmError(f"packed tensor has {packed.numel()} bytes, expected {packed_nbytes(numel, bits)} for "
                         f"{numel} {bits}-bit codes: the export is corrupt, export the model again")


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of `pack_codes`: the first `numel` codes as a flat int8 tensor."""
    _check_packed(packed, bits, numel)
    lo, _ = code_range(bits)
    if 8 % bits == 0:  # one table lookup per byte: byte -> its 8/b codes
        table = _byte_table(bits)
        out = torch.empty(packed.numel(), table.shape[1], dtype=torch.int8)
        # a block of bytes at a time: the int32 indices are 4x the packed bytes, the codes 8/b x
        for start in range(0, packed.numel(), _CHUNK):
            block = packed[start:start + _CHUNK]
            torch.index_select(table, 0, block.to(torch.int32), out=out[start:start + block.numel()])
        return out.reshape(-1)[:numel]
    shifts = torch.arange(8, dtype=torch.uint8)
    stream = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[: numel * bits].view(numel, bits)
    weights = (torch.ones(bits, dtype=torch.int16) << torch.arange(bits, dtype=torch.int16))
    u = (stream.to(torch.int16) * weights).sum(dim=1)
    return (u.to(torch.int16) + lo).to(torch.int8)


class PackedCodes:
    """The codes of one packed tensor, [rows, ...], decoded a block of rows at a time (`codes[a:b]`).

    Loading decodes every table through this, never as a whole: a row block's int8 codes are
    written straight into their destination (a float weight, a kernel's packed layout) and freed, so
    no full-size int8 (or int16, or float) copy of a large table is made on the way, and the heap
    holds no large temporary that glibc would keep resident as a hole. `full()` decodes it all
    (int8 mode keeps the int8 codes themselves)."""

    def __init__(self, packed: Tensor, bits: int, shape: list[int] | tuple[int, ...]):
        self.shape = torch.Size(shape)
        self.bits = bits
        self.numel = self.shape.numel()
        self._row = self.numel // self.shape[0] if self.shape and self.shape[0] else 0
        _check_packed(packed, bits, self.numel)
        self._packed = packed

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> Tensor:
        """int8 codes of rows [start, stop) (a slice with step 1)."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("PackedCodes decodes contiguous row ranges only: codes[start:stop]")
        start, stop, _ = rows.indices(self.shape[0])
        stop = max(stop, start)
        first, last = start * self._row, stop * self._row
        # the stream's byte boundaries fall every 8 / gcd(8, bits) codes: start at the one before `first`
        align = 8 // math.gcd(8, self.bits)
        lead = first % align
        count = last - first + lead
        byte = (first - lead) * self.bits // 8
        codes = unpack_codes(self._packed[byte:byte + packed_nbytes(count, self.bits)], self.bits, count)
        return codes[lead:].view(stop - start, *self.shape[1:])

    def full(self) -> Tensor:
        """All the codes as one int8 tensor of `shape`."""
        return unpack_codes(self._packed, self.bits, self.numel).view(self.shape)

    def block_rows(self, elements: int | None = None) -> int:
        """Rows per block so that a block holds about `elements` codes (default: as many as
        unpack_codes decodes per step; at least one row)."""
        return max(1, (_CHUNK if elements is None else elements) // max(1, self._row))
