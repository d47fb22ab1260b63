"""int8 inference: integer codes in memory, 8-bit activations quantized on the fly, int32 matmuls.

Kernel: `torch._int_mm` (int8 x int8 -> int32, available on CPU). It lets the activation
quantization be exactly the student's (dynamic per-tensor min-max, asymmetric with a zero point),
which the fbgemm dynamic-quantized Linear of `torch.ao.quantization.quantize_dynamic` does not
(it picks its own 7-bit reduced-range activation scale; its API is also deprecated); see the
README for the measurements behind the choice.

Asymmetric 8-bit activations q in [0, 255] with zero point z do not fit int8, so they are shifted:
    x_q = (q - z) * s_x = (q' + c) * s_x      with q' = q - 128 in int8 and c = 128 - z
    x_q @ W_q^T = s_x * s_w * (q' @ C^T + c * rowsum(C))       (C: int8 weight codes)
The bracket is computed exactly in int32; only the final scaling is float, so the result equals
the fake-quant student's up to float rounding of the accumulation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qgplm.quant.functional import EPS, levels
from qgplm.quant.modules import QuantConv1D, QuantEmbedding, QuantLinear
from qgplm.quant.quantizers import ActivationQuantizer


def quantize_activation(x: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(int8 q', integer offset c, step s_x) with x_q = (q' + c) * s_x, the rounding of
    `minmax_activation_quantize` (same formulas, same float ops)."""
    if symmetric:
        n = levels(bits)
        step = (x.abs().amax() / n).clamp_min(EPS)
        q = torch.clamp(torch.round(x / step), -n, n)
        return q.to(torch.int8), torch.zeros((), dtype=torch.int32), step
    lo, hi = torch.aminmax(x)  # the same values as amin() / amax(), one pass
    qmax = 2**bits - 1
    step = ((hi - lo) / qmax).clamp_min(EPS)
    zero = torch.round(-lo / step)
    q = torch.clamp(torch.round(x / step) + zero, 0, qmax)
    return (q - 128).to(torch.int8), (128 - zero).to(torch.int32), step


class Int8Linear(nn.Module):
    """y = dequant(int_mm(quant8(x), codes^T)) + bias, for nn.Linear and GPT-2's Conv1D.

    `codes` is [out, in] int8 (the quantizer's orientation; shared with a tied embedding),
    `step` the weight step (scalar, or [out, 1] per row).
    """

    def __init__(self, codes: Tensor, step: Tensor, bias: Tensor | None, act: ActivationQuantizer):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes)
        self.register_buffer("step", step.reshape(-1))  # [1] or [out]
        self.register_buffer("rowsum", codes.sum(dim=1, dtype=torch.int32))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.act_bits, self.act_symmetric = act.bits, act.symmetric

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape[:-1] + (self.out_features,)
        x2 = x.reshape(-1, self.in_features)
        q, c, sx = quantize_activation(x2, self.act_bits, self.act_symmetric)
        acc = torch._int_mm(q, self.codes.t())
        if not self.act_symmetric:
            acc = acc + c * self.rowsum
        out = acc.to(x.dtype) * (sx * self.step)
        if self.bias is not None:
            out = out + self.bias
        return out.view(shape)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, act_bits={self.act_bits}"


class Int8Embedding(nn.Module):
    """Token embedding holding int8 codes: rows are gathered as codes, then scaled (codes * step,
    the same float op as the dequantized table, so lookups equal the student's)."""

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


def convert_int8(model: nn.Module, codes_of: dict[str, tuple[Tensor, Tensor]]) -> nn.Module:
    """Replace the loaded quantized layers by int8 ones in place (codes shared between tied layers)."""
    built: dict[int, nn.Module] = {}
    swaps = []
    for name, mod in model.named_modules(remove_duplicate=False):
        if not isinstance(mod, (QuantLinear, QuantConv1D, QuantEmbedding)):
            continue
        key = getattr(mod.weight_quantizer, "export_key", None)
        aq = getattr(mod, "act_quantizer", None)
        if key is None or (not isinstance(mod, QuantEmbedding) and aq is None):
            continue  # FP weight or no 8-bit input: the layer stays as loaded
        if id(mod) not in built:
            codes, step = codes_of[key]
            if isinstance(mod, QuantEmbedding):
                built[id(mod)] = Int8Embedding(codes, step, mod.padding_idx, mod.embed_scale)
            else:
                built[id(mod)] = Int8Linear(codes, step, mod.bias, aq)
        swaps.append((name, built[id(mod)]))
    for name, new in swaps:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model
