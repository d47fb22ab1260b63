"""Low-bit inference: weight codes stay at their bit-width in memory, matmuls run on onnxruntime's
`com.microsoft.MatMulNBits` CPU kernel.

Why onnxruntime (docs/deploy.md has the measurements): its MLAS kernel multiplies
2/4/8-bit weights with int8-quantized activations (accuracy_level=4) on x86 and ARM, it takes the
student's codes as they are (unsigned code = code + 2^(b-1) with the kernel's default zero point
2^(b-1), one fp32 scale per block), and the same operator runs whole exported GPT-2 and BART graphs
(`export/converters/onnx.py`), so one runtime covers both architectures. llama.cpp has faster ternary formats
but no BART.

Mapping of the student's codes (exact, no re-quantization):
    ternary {-1, 0, 1} and the full grid {-2, -1, 0, 1} at 2 bits -> unsigned {0..3}, zero point 2;
    4-bit codes [-8, 7] -> {0..15}, zero point 8; 8-bit [-128, 127] -> {0..255}, zero point 128;
    3-bit codes are held as 4-bit (MatMulNBits has no 3-bit kernel), 5-7-bit codes as 8-bit.
The step (alpha / n, per tensor or per row) becomes the scale of every block of its row, in fp32:
the kernel's dequantized weight (u - zp) * scale equals the student's codes * step exactly.

Activations: the kernel quantizes each row's input to int8 per block of `block_size` inputs
(symmetric, its own scale), not with the student's per-tensor min-max; the cost of that
difference is measured by `experiments/bench_lowbit_quality.py` (perplexity and ROUGE).

Memory: each layer is one small onnxruntime session whose initializers are memory-mapped from a
private temporary file (so they are not copied into the process), then repacked once by MLAS into
its compute layout (codes + an fp32 scale and block sum per block). The token embedding keeps its
codes packed in a torch uint8 table and unpacks only the looked-up rows.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qgplm.errors import QgplmError, optional_module
from qgplm.export.format.pack import PackedCodes, row_steps
from qgplm.export.runtimes.heap import release_freed_heap
from qgplm.quant.modules import KernelLayer

KERNEL_BITS = (2, 4, 8)
DEFAULT_BLOCK = 64
DEFAULT_ACCURACY_LEVEL = 4
_ALIGN = 65536  # external-data offsets aligned to the page/allocation granularity, so they are mmapped


def onnxruntime_module():
    return optional_module("onnxruntime", "mode=lowbit", "use mode=int8 / mode=dequantize")


def kernel_bits(bits: int) -> int:
    """The MatMulNBits bit-width that holds `bits`-bit codes exactly (2, 4 or 8)."""
    for kb in KERNEL_BITS:
        if bits <= kb:
            return kb
    raise QgplmError(f"{bits}-bit weights cannot run on the low-bit kernel: supported are 2..8 bits")


def pack_rows(codes: Tensor | PackedCodes, bits: int, block_size: int) -> np.ndarray:
    """MatMulNBits' B: uint8 [N, blocks, block_size * bits / 8] from signed codes [N, K] (a tensor, or
    an export's PackedCodes, decoded here a block of rows at a time).

    Each row is cut into blocks of `block_size` codes (the last one padded with the zero point, so
    the padding dequantizes to 0); within a block, code j sits in bits [(j % per) * bits, ...) of
    byte j // per, per = 8 // bits, least significant first (the layout onnxruntime documents)."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"bits={bits}: MatMulNBits packs 2, 4 or 8 bits")
    n, k = codes.shape
    blocks = -(-k // block_size)
    per = 8 // bits
    out = torch.empty(n, blocks, block_size // per, dtype=torch.uint8)
    # a block of rows at a time: the int16 temporaries are 2-4x the codes (GPT-2's tied LM head: 147 MiB),
    # and an export's codes are only ever decoded a block at a time
    for start in range(0, n, _ROWS):
        out[start:start + _ROWS] = _pack_block(codes[start:start + _ROWS], bits, blocks, block_size)
    return out.numpy()


_ROWS = 1024  # rows per block: about 1 M codes of a 768-wide layer, a few MiB of temporaries


def _pack_block(codes: Tensor, bits: int, blocks: int, block_size: int) -> Tensor:
    """pack_rows of a few rows, as a uint8 tensor [rows, blocks, block_size * bits / 8]."""
    n, k = codes.shape
    zero = 2 ** (bits - 1)
    u = torch.full((n, blocks * block_size), zero, dtype=torch.int16)
    u[:, :k] = codes.to(torch.int16) + zero
    if int(u.min()) < 0 or int(u.max()) >= 2 ** bits:
        raise QgplmError(f"codes out of the {bits}-bit range: the export is corrupt, export it again")
    per = 8 // bits
    u = u.view(n, blocks, block_size // per, per).to(torch.uint8)
    out = torch.zeros(u.shape[:-1], dtype=torch.uint8)
    for i in range(per):
        out |= u[..., i] << (bits * i)
    return out


def unpack_rows(packed: np.ndarray | Tensor, bits: int, k: int) -> Tensor:
    """Inverse of pack_rows: signed int16 codes [N, K] from packed rows [N, ...] (MatMulNBits' B, or
    rows of LowBitEmbedding's table)."""
    p = packed if isinstance(packed, Tensor) else torch.from_numpy(np.ascontiguousarray(packed))
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    u = (p.unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    return u.reshape(p.shape[0], -1)[:, :k].to(torch.int16) - 2 ** (bits - 1)


def block_scales(step: Tensor, n: int, blocks: int) -> np.ndarray:
    """fp32 [N * blocks]: the row's step (or the tensor's) repeated for every block of the row."""
    return row_steps(step, n).repeat_interleave(blocks).contiguous().numpy()


def matmul_nbits_node(helper, a: str, b: str, scales: str, y: str, *, k: int, n: int, bits: int,
                      block_size: int, accuracy_level: int, name: str = ""):
    """One `com.microsoft.MatMulNBits` node: y = a @ dequant(b)^T (shared with the ONNX exporter)."""
    return helper.make_node("MatMulNBits", [a, b, scales], [y], domain="com.microsoft", name=name or y,
                            K=k, N=n, bits=bits, block_size=block_size, accuracy_level=accuracy_level)


def external_tensor(name: str, array: np.ndarray, location: str, offset: int):
    """A TensorProto whose data lives in `location` at `offset` (onnx's external-data keys)."""
    from onnx import TensorProto, helper

    t = TensorProto()
    t.name = name
    t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    t.dims.extend(array.shape)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def write_external(f, arrays: list[np.ndarray], offset: int) -> list[int]:
    """Write arrays at `_ALIGN`-aligned offsets from `offset`; returns each array's offset."""
    offsets = []
    for arr in arrays:
        offset = -(-offset // _ALIGN) * _ALIGN
        f.seek(offset)
        f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))  # no bytes copy of the array
        offsets.append(offset)
        offset += arr.nbytes
    return offsets


class _SessionFactory:
    """Builds the per-layer sessions of one model: options shared, initializers in one private
    temporary directory that lives as long as the model (its files are memory-mapped)."""

    def __init__(self, threads: int):
        ort = onnxruntime_module()
        self.ort = ort
        self.dir = tempfile.TemporaryDirectory(prefix="qgplm-lowbit-")
        self.count = 0
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.enable_cpu_mem_arena = False  # the arena would keep each layer's largest output
        opts.enable_mem_pattern = False
        # no busy-waiting between calls: torch runs the rest of the model on the same cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self.options = opts

    def session(self, b: np.ndarray, scales: np.ndarray, *, k: int, n: int, bits: int, block_size: int,
                accuracy_level: int):
        from onnx import TensorProto, helper, save

        self.count += 1
        stem = Path(self.dir.name) / f"layer{self.count}"
        with open(f"{stem}.bin", "wb") as f:
            off_b, off_s = write_external(f, [b, scales], 0)
        loc = f"{stem.name}.bin"
        node = matmul_nbits_node(helper, "A", "B", "S", "Y", k=k, n=n, bits=bits, block_size=block_size,
                                 accuracy_level=accuracy_level)
        graph = helper.make_graph([node], "matmul_nbits",
                                  [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                                  [external_tensor("B", b, loc, off_b), external_tensor("S", scales, loc, off_s)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        save(model, f"{stem}.onnx")
        try:
            sess = self.ort.InferenceSession(f"{stem}.onnx", self.options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise QgplmError(f"onnxruntime refused a {n}x{k} {bits}-bit layer (block_size={block_size}): "
                             f"{str(e).splitlines()[0]}; supported: bits 2/4/8, block_size a power of 2 "
                             f">= 16 (64 is the fast default)") from None
        os.unlink(f"{stem}.onnx")  # the graph is parsed; the .bin stays mapped
        return sess


class LowBitLinear(KernelLayer):
    """y = MatMulNBits(x, codes, step) + bias for nn.Linear and GPT-2's Conv1D; `codes` is
    [out, in] (the quantizer's orientation). Float32 in and out; the kernel holds the weights."""

    mode = "lowbit"

    def __init__(self, codes: Tensor | PackedCodes, step: Tensor, bits: int, bias: Tensor | None,
                 factory: _SessionFactory,
                 block_size: int = DEFAULT_BLOCK, accuracy_level: int = DEFAULT_ACCURACY_LEVEL):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.bits, self.kernel_bits, self.block_size = bits, kernel_bits(bits), block_size
        blocks = -(-self.in_features // block_size)
        b = pack_rows(codes, self.kernel_bits, block_size)
        s = block_scales(step, self.out_features, blocks)
        self.session = factory.session(b, s, k=self.in_features, n=self.out_features, bits=self.kernel_bits,
                                       block_size=block_size, accuracy_level=accuracy_level)
        self._factory = factory  # keeps the mapped files alive
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape[:-1] + (self.out_features,)
        a = x.reshape(-1, self.in_features).float().contiguous().numpy()
        y = torch.from_numpy(self.session.run(None, {"A": a})[0])
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.view(shape).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits} "
                f"(kernel {self.kernel_bits}-bit), block_size={self.block_size}")


class LowBitEmbedding(KernelLayer):
    """Token embedding whose codes stay packed (8 // bits per byte, row-major): looked-up rows are
    unpacked and scaled as (u - zero) * step, the same float product as the dequantized table."""

    mode = "lowbit"

    def __init__(self, codes: Tensor | PackedCodes, step: Tensor, bits: int, padding_idx: int | None,
                 embed_scale: float | Tensor | None, packed: Tensor | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.bits = kernel_bits(bits)
        self.padding_idx = padding_idx
        per = 8 // self.bits
        if packed is None:  # else: the table of another module with the same codes (BART's three)
            width = -(-self.embedding_dim // per) * per
            packed = torch.from_numpy(pack_rows(codes, self.bits, width)).view(codes.shape[0], -1)
        self.register_buffer("packed", packed)
        self.register_buffer("step", step.float())  # () or [vocab, 1]
        self.embed_scale = embed_scale

    def _rows(self, ids: Tensor) -> Tensor:
        """The codes of the looked-up rows, as float (exact integers)."""
        rows = F.embedding(ids, self.packed)
        codes = unpack_rows(rows.reshape(-1, rows.shape[-1]), self.bits, self.embedding_dim)
        return codes.view(*ids.shape, self.embedding_dim).to(torch.float32)

    @property
    def weight(self) -> Tensor:
        """The dequantized table, built on demand (HF only reads its shape, dtype and device)."""
        return self._rows(torch.arange(self.num_embeddings)) * self.step

    def forward(self, ids: Tensor) -> Tensor:
        out = self._rows(ids) * (self.step if self.step.dim() == 0 else F.embedding(ids, self.step))
        return out if self.embed_scale is None else out * self.embed_scale

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits} (packed)"


def convert_lowbit(model: nn.Module, codes_of: Mapping[str, tuple[Tensor | PackedCodes, Tensor]],
                   bits_of: dict[str, int], *,
                   block_size: int = DEFAULT_BLOCK, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
                   threads: int | None = None) -> nn.Module:
    """Replace the loaded quantized layers by low-bit ones in place: every quantized linear layer
    (and a tied LM head) runs on MatMulNBits, every quantized embedding keeps packed codes."""
    from qgplm.quant.modules import QUANT_MODULES, QuantEmbedding
    from qgplm.quant.walk import swap_modules

    if block_size < 16 or block_size & (block_size - 1):
        raise QgplmError(f"block_size={block_size} is not valid: use a power of 2 >= 16 (64 is the fast default)")
    factory = _SessionFactory(torch.get_num_threads() if threads is None else threads)
    tables: dict[str, Tensor] = {}  # one packed table per export key, shared by every embedding using it

    def lowbit_layer(name: str, mod: nn.Module) -> nn.Module | None:
        key = getattr(mod.weight_quantizer, "export_key", None)
        if key is None:
            return None  # FP weight: the layer stays as loaded
        codes, step = codes_of[key]
        if isinstance(mod, QuantEmbedding):
            emb = LowBitEmbedding(codes, step, bits_of[key], mod.padding_idx, mod.embed_scale, tables.get(key))
            tables[key] = emb.packed
            return emb
        layer = LowBitLinear(codes, step, bits_of[key], mod.bias, factory, block_size, accuracy_level)
        release_freed_heap()  # onnxruntime's repacking temporaries, before the next layer adds its own
        return layer

    swap_modules(model, lambda name, mod: isinstance(mod, QUANT_MODULES), lowbit_layer)
    # the factory's temporary directory is removed by TemporaryDirectory's own finalizer once the
    # last LowBitLinear holding the factory is gone
    return model
