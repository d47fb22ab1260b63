"""Optional 8-bit quantization of the attention matmuls (off by default, a flag; docs/method.md).

When `QuantConfig.quantize_attention` is set, `quantize_model` switches the model to the
attention implementation registered here ("qgplm_quant", through transformers'
AttentionInterface, so it works for every model that dispatches attention through it: GPT-2,
BART, Llama, OPT, ...) and gives each attention module an `attn_act_quantizer`. The score matmul
then sees 8-bit queries and keys, and the value matmul 8-bit attention probabilities and values,
all dynamic per-tensor min-max with the STE, their ranges over real tokens only (queries of real
tokens, keys some real query may see: `qgplm.quant.token_mask.attention_masks`). With the
quantizers disabled it is exactly eager attention.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from qgplm.quant.token_mask import allowed_keys, attention_masks

IMPLEMENTATION = "qgplm_quant"


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def quantized_eager_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                              **kwargs) -> tuple[Tensor, Tensor]:
    aq = getattr(module, "attn_act_quantizer", None)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.shape[-2]]
    allowed = allowed_keys(attention_mask) if aq is not None else None
    # rows of real queries [B, T] / keys [B, S] (None: all real), as masks of [B, H, T|S, d]
    q_real, k_real = attention_masks(query, allowed) if aq is not None else (None, None)
    q_rows = None if q_real is None else q_real[:, None, :, None]
    k_rows = None if k_real is None else k_real[:, None, :, None]
    if q_rows is None or k_rows is None:
        p_mask = q_rows if k_rows is None else k_rows.transpose(-1, -2)
    else:
        p_mask = q_rows & k_rows.transpose(-1, -2)  # [B, 1, T, S]

    def quant(t: Tensor, mask: Tensor | None) -> Tensor:
        return t if aq is None else aq(t, mask)

    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(quant(query, q_rows), quant(key, k_rows).transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    probs_q = quant(probs, p_mask)
    if aq is not None:
        # a masked weight (exactly 0 after the softmax) stays exactly 0: a range taken over real
        # pairs may lie above 0, and a pad key's weight clamped up to it would let the pad's value
        # into a real token's output (an identity when the quantizer is disabled)
        probs_q = probs_q.masked_fill(probs == 0, 0.0)
    out = torch.matmul(probs_q, quant(value, k_rows))
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(IMPLEMENTATION, quantized_eager_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)


def is_attention_module(mod: nn.Module) -> bool:
    """Modules that call the attention interface: they carry the model config and a head dim."""
    return type(mod).__name__.endswith("Attention") and hasattr(mod, "config")
