"""Optional 8-bit quantization of the attention matmuls (off by default, a flag; docs/method.md).

When `QuantConfig.quantize_attention` is set, `quantize_model` switches the model to the
attention implementation registered here ("qgplm_quant", through transformers'
AttentionInterface, so it works for every model that dispatches attention through it: GPT-2,
BART, Llama, OPT, ...) and gives each attention module an `attn_act_quantizer`. The score matmul
then sees 8-bit queries and keys, and the value matmul 8-bit attention probabilities and values,
all dynamic per-tensor min-max with the STE. With the quantizers disabled it is exactly eager
attention.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

IMPLEMENTATION = "qgplm_quant"


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def quantized_eager_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                              **kwargs) -> tuple[Tensor, Tensor]:
    aq = getattr(module, "attn_act_quantizer", None)
    quant = (lambda t: t) if aq is None else aq
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(quant(query), quant(key).transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(quant(probs), quant(value))
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(IMPLEMENTATION, quantized_eager_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)


def is_attention_module(mod: nn.Module) -> bool:
    """Modules that call the attention interface: they carry the model config and a head dim."""
    return type(mod).__name__.endswith("Attention") and hasattr(mod, "config")
