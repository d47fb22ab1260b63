"""Quantized drop-in replacements for nn.Linear, GPT-2's Conv1D and nn.Embedding.

Each replacement subclasses the layer it replaces and *reuses its Parameter objects*, so weight
tying (GPT-2's LM head and token embedding, BART's shared embedding), parameter names and
state-dict keys all stay those of the Hugging Face model; the quantizers only add their own
scale entries (`<layer>.weight_quantizer.gamma`, ...).
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from qgplm.quant.quantizers import ActivationQuantizer, WeightQuantizer


def _maybe(q: nn.Module | None, x: Tensor) -> Tensor:
    return x if q is None else q(x)


def _quantized(layer: nn.Module, w: Tensor) -> Tensor:
    """`layer`'s fake-quantized weight; a shared quantizer (a tied table) is told which layer asks,
    so that it quantizes the table once a forward (`WeightQuantizer.forward`)."""
    wq = layer.weight_quantizer
    return wq(w, layer) if wq.shared else wq(w)


class QuantLinear(nn.Linear):
    """nn.Linear with a fake-quantized weight and (optionally) an 8-bit quantized input."""

    weight_quantizer: WeightQuantizer
    act_quantizer: ActivationQuantizer | None

    @classmethod
    def from_float(cls, mod: nn.Linear, wq: WeightQuantizer, aq: ActivationQuantizer | None) -> QuantLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = mod.in_features, mod.out_features
        new.weight, new.bias = mod.weight, mod.bias
        new.weight_quantizer, new.act_quantizer = wq, aq
        new.train(mod.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(_maybe(self.act_quantizer, x), _quantized(self, self.weight), self.bias)


class QuantConv1D(Conv1D):
    """transformers' Conv1D (weight stored [in, out]) with quantized weight and input.

    The quantizer sees the weight as [out, in] so that per-row scaling is per output channel,
    as for nn.Linear.
    """

    weight_quantizer: WeightQuantizer
    act_quantizer: ActivationQuantizer | None

    @classmethod
    def from_float(cls, mod: Conv1D, wq: WeightQuantizer, aq: ActivationQuantizer | None) -> QuantConv1D:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.nf, new.nx = mod.nf, mod.nx
        new.weight, new.bias = mod.weight, mod.bias
        new.weight_quantizer, new.act_quantizer = wq, aq
        new.train(mod.training)
        return new

    __repr__ = nn.Module.__repr__  # Conv1D's own repr would hide the quantizers

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"

    def quantized_weight(self) -> Tensor:
        return self.weight_quantizer(self.weight.t()).t()

    def forward(self, x: Tensor) -> Tensor:
        x = _maybe(self.act_quantizer, x)
        size_out = x.size()[:-1] + (self.nf,)
        out = F.linear(x.reshape(-1, x.size(-1)), self.quantized_weight().t(), self.bias)
        return out.view(size_out)


class QuantEmbedding(nn.Embedding):
    """Token embedding with a fake-quantized table. Keeps `embed_scale` of scaled embeddings (BART)."""

    weight_quantizer: WeightQuantizer

    @classmethod
    def from_float(cls, mod: nn.Embedding, wq: WeightQuantizer) -> QuantEmbedding:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(new, attr, getattr(mod, attr))
        new.weight = mod.weight
        new.embed_scale = getattr(mod, "embed_scale", None)
        new.weight_quantizer = wq
        new.train(mod.training)
        return new

    def forward(self, input: Tensor) -> Tensor:
        out = F.embedding(input, _quantized(self, self.weight), self.padding_idx, self.max_norm,
                          self.norm_type, self.scale_grad_by_freq, self.sparse)
        return out if self.embed_scale is None else out * self.embed_scale


QUANT_MODULES = (QuantLinear, QuantConv1D, QuantEmbedding)


class KernelLayer(nn.Module):
    """A layer of a model loaded to run on an inference kernel (`load_quantized(mode="int8"|"lowbit")`).
    It holds its codes in the kernel's own layout, so such a model is neither trained nor exported
    again: exporters recognise it by this type and name its `mode` in the refusal."""

    mode: ClassVar[str] = ""
