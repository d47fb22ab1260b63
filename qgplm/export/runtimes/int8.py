"""int8 inference: integer codes in memory, 8-bit activations quantized on the fly, int32 matmuls.

Activations are quantized with exactly the student's rule (dynamic min-max, asymmetric with a zero
point, or symmetric; per tensor with the range over real tokens only, qgplm.quant.token_mask, or
per token), then
multiplied with the int8 weight codes by one of two CPU integer kernels, picked by measurement
(docs/deploy.md, `experiments/bench_export.py --kernels`):

- "onednn" (default for a layer that owns its codes): `torch.ops.onednn.qlinear_pointwise`, the
  oneDNN u8 x s8 -> s32 kernel PyTorch's x86 inductor quantization lowers to. It takes plain
  uint8 activations with their scale and zero point, per-tensor or per-row weight scales and the
  bias, so the zero point and the scaling are folded in by the kernel. On the 2-core dev CPU, one
  768x3072 layer: 47 us at 1 row vs 112 us for `torch._int_mm`, 178 vs 239 us at 128 rows.
  Its prepacked weight is an opaque oneDNN tensor, so it cannot be shared with an embedding.
- "int_mm": `torch._int_mm` (int8 x int8 -> int32) on the int8 codes themselves; used by a tied
  LM head, whose codes are the token embedding's (one copy in memory), and where oneDNN is absent.
  Asymmetric 8-bit activations q in [0, 255] with zero point z do not fit int8, so they are shifted:
      x_q = (q - z) * s_x = (q' + c) * s_x      with q' = q - 128 in int8 and c = 128 - z
      x_q @ W_q^T = s_x * s_w * (q' @ C^T + c * rowsum(C))       (C: int8 weight codes)
  The bracket is computed exactly in int32; only the final scaling is float. Per-token activations
  (one s_x and c per row) take this kernel too: oneDNN's takes one activation scale per tensor.

Both give the fake-quant student's result up to float rounding of the final scaling. Rejected by
measurement: fbgemm's dynamic quantized linear (`quantize_dynamic`; picks its own reduced-range
activation scale, and its quantized-tensor API is deprecated in torch 2.13) and torchao 0.18's
int8-activation configs, which run eager on this CPU at 299 us (int8 weights) and 1374 us (intx
weights, no x86 low-bit kernel) for the same layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qgplm.quant.functional import minmax_activation_codes
from qgplm.quant.modules import QUANT_MODULES, KernelLayer, QuantEmbedding
from qgplm.quant.quantizers import ActivationQuantizer
from qgplm.quant.token_mask import activation_mask
from qgplm.quant.walk import swap_modules


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's quantized linear (x86 and aarch64 CPU builds)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def cuda_int_mm_ok(a: Tensor, b: Tensor) -> bool:
    """Whether `torch._int_mm(a, b)` meets CUDA's shape rules (cuBLASLt's int8 GEMM, aten
    `_int_mm_out_cuda`): more than 16 rows in `a`, inner and output dimensions multiples of 8.
    The CPU kernel takes any shape."""
    return a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0


def int_mm(a: Tensor, b: Tensor, cuda_rules: bool | None = None) -> Tensor:
    """`torch._int_mm(a, b)` for any shape: under CUDA's rules (`cuda_rules`, default: whether `a`
    is on a GPU) the operands are zero-padded up to them and the result sliced back. Zero rows and
    columns add nothing to an integer product, so the result is exact; on CPU (or when the shapes
    already fit) nothing is copied. Generation runs 1-row matmuls, which CUDA would refuse."""
    if cuda_rules is None:
        cuda_rules = a.is_cuda
    if not cuda_rules or cuda_int_mm_ok(a, b):
        return torch._int_mm(a, b)
    m, k = a.shape
    n = b.shape[1]
    pad_k, pad_n = -k % 8, -n % 8
    a = F.pad(a, (0, pad_k, 0, max(17 - m, 0)))
    b = F.pad(b, (0, pad_n, 0, pad_k))
    return torch._int_mm(a, b)[:m, :n]


def quantize_activation_u8(x: Tensor, bits: int, symmetric: bool, mask: Tensor | None = None,
                           granularity: str = "tensor") -> tuple[Tensor, float | Tensor, int | Tensor]:
    """(uint8 q, scale, zero point) with x_q = (q - zero) * scale: the student's codes
    (`minmax_activation_codes`, range over the `mask`ed rows: real tokens, or per token); symmetric
    codes are stored shifted by 128, an exact change of zero point. Per token, scale and zero point
    are [rows, 1] tensors (float, int32); per tensor, Python numbers (oneDNN's arguments)."""
    codes, step, zero = minmax_activation_codes(x, bits, symmetric, mask, granularity)
    if granularity == "token":
        zero = torch.full_like(step, 128) if symmetric else zero
        return (codes + 128 if symmetric else codes).to(torch.uint8), step, zero.to(torch.int32)
    if symmetric:
        return codes.add_(128).to(torch.uint8), step.item(), 128
    return codes.to(torch.uint8), step.item(), int(zero.item())


KERNELS = ("onednn", "int_mm")
_CHUNK_ROWS = 4096


def rowsums(codes: Tensor) -> Tensor:
    """int32 [out]: the sum of each row of int8 `codes`, a block of rows at a time: `sum(dtype=int32)`
    converts its whole input to int32 first, a transient 4x the codes (GPT-2's tied LM head: 147 MiB)."""
    return torch.cat([c.sum(dim=1, dtype=torch.int32) for c in codes.split(_CHUNK_ROWS)])


class Int8Linear(KernelLayer):
    """y = dequant(intmatmul(quant8(x), codes^T)) + bias, for nn.Linear and GPT-2's Conv1D.

    `codes` is [out, in] int8 (the quantizer's orientation), `step` the weight step (scalar, or
    [out, 1] per row). kernel="onednn" holds oneDNN's prepacked copy of the codes and drops them;
    kernel="int_mm" holds the codes themselves (so a tied LM head shares the embedding's).
    """

    mode = "int8"

    def __init__(self, codes: Tensor, step: Tensor, bias: Tensor | None, act: ActivationQuantizer,
                 kernel: str = "onednn"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r}: choose one of {', '.join(KERNELS)}")
        if kernel == "onednn" and (not onednn_available() or codes.device.type != "cpu"
                                   or act.granularity == "token"):
            kernel = "int_mm"
        self.kernel = kernel
        self.out_features, self.in_features = codes.shape
        self.register_buffer("step", step.reshape(-1).float())  # [1] or [out]
        if kernel == "onednn":
            # opaque oneDNN layout; rebuilt from the export at load time, never saved
            self.register_buffer("packed", torch.ops.onednn.qlinear_prepack(codes, None), persistent=False)
            self.register_buffer("zero", torch.zeros_like(self.step, dtype=torch.int32), persistent=False)
        else:
            self.register_buffer("codes", codes)
            self.register_buffer("rowsum", rowsums(codes))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.act_bits, self.act_symmetric, self.act_granularity = act.bits, act.symmetric, act.granularity

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape[:-1] + (self.out_features,)
        rows = activation_mask(x) if self.act_granularity == "tensor" else None  # real tokens set the range
        rows = None if rows is None else rows.reshape(-1, 1)
        if self.kernel == "onednn":
            q, sx, zx = quantize_activation_u8(x.reshape(-1, self.in_features), self.act_bits, self.act_symmetric,
                                               rows)
            out = torch.ops.onednn.qlinear_pointwise(q, sx, zx, self.packed, self.step, self.zero, self.bias,
                                                     1.0, 0, x.dtype, "none", [], "")
            return out.view(shape)
        # int8 operands for _int_mm: q - 128 (flipping the top bit of the uint8 code), offset c
        # = 128 - zero folded in below through the row sums (c = 0 for symmetric codes)
        qu, sx, zx = quantize_activation_u8(x.reshape(-1, self.in_features), self.act_bits, self.act_symmetric,
                                            rows, self.act_granularity)
        q, c = qu.bitwise_xor_(128).view(torch.int8), 128 - zx
        if q.shape[0] < 16 or self.out_features >= 16 * self.in_features:
            # codes @ q^T: oneDNN is faster with the long dimension as rows (measured on the 2-core
            # CPU: LM head 50257x768 at 1 row 1.36 vs 2.00 ms, at 128 rows 6.0 vs 22 ms)
            acc = int_mm(self.codes, q.t().contiguous()).t()
        else:
            acc = int_mm(q, self.codes.t())
        if not self.act_symmetric:
            acc = acc + c * self.rowsum
        out = acc.to(x.dtype) * (sx * self.step)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(shape)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, act_bits={self.act_bits}, "
                f"act_granularity={self.act_granularity}, kernel={self.kernel}")


class Int8Embedding(KernelLayer):
    """Token embedding holding int8 codes: rows are gathered as codes, then scaled (codes * step,
    the same float op as the dequantized table, so lookups equal the student's)."""

    mode = "int8"

    def __init__(self, codes: Tensor, step: Tensor, padding_idx: int | None, embed_scale: float | Tensor | None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.padding_idx = padding_idx
        self.register_buffer("codes", codes)
        self.register_buffer("step", step)  # () or [vocab, 1]
        self.embed_scale = embed_scale

    @property
    def weight(self) -> Tensor:
        """The dequantized table (built on demand; HF only reads its shape/dtype/device)."""
        return self.codes.to(self.step.dtype) * self.step

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.codes).to(self.step.dtype)
        out = rows * (self.step if self.step.dim() == 0 else F.embedding(ids, self.step))
        return out if self.embed_scale is None else out * self.embed_scale


def convert_int8(model: nn.Module, codes_of: dict[str, tuple[Tensor, Tensor]], kernel: str = "onednn") -> nn.Module:
    """Replace the loaded quantized layers by int8 ones in place. Codes used by more than one
    layer (a tied LM head and its embedding) are held once, as int8, so their linear layer runs
    on `torch._int_mm`; the other linear layers use `kernel`."""
    users: dict[str, set[int]] = {}
    for mod in model.modules():
        key = getattr(getattr(mod, "weight_quantizer", None), "export_key", None)
        if key is not None:
            users.setdefault(key, set()).add(id(mod))

    def int8_layer(name: str, mod: nn.Module) -> nn.Module | None:
        key = getattr(mod.weight_quantizer, "export_key", None)
        aq = getattr(mod, "act_quantizer", None)
        if key is None or (not isinstance(mod, QuantEmbedding) and aq is None):
            return None  # FP weight or no 8-bit input: the layer stays as loaded
        codes, step = codes_of[key]
        if isinstance(mod, QuantEmbedding):
            return Int8Embedding(codes, step, mod.padding_idx, mod.embed_scale)
        shared = len(users[key]) > 1
        return Int8Linear(codes, step, mod.bias, aq, "int_mm" if shared else kernel)

    swap_modules(model, lambda name, mod: isinstance(mod, QUANT_MODULES), int8_layer)
    return model
