"""The architectures format=gguf writes, laid out as llama.cpp's converter (convert_hf_to_gguf.py:
GPT2Model, LlamaModel, Qwen2Model) lays them out: tensor names, hyper-parameter keys, and the
Q/K row permutation of LlamaModel.permute.

    GPT2LMHeadModel                         arch "gpt2"
    LlamaForCausalLM, MistralForCausalLM    arch "llama": RMSNorm, SwiGLU, RoPE on pairs of
                                            consecutive values, so the rows of attn_q / attn_k
                                            (and their biases) are permuted from HF's half-split
                                            RoPE layout, per head
    Qwen2ForCausalLM                        arch "qwen2": the same graph with q/k/v biases and
                                            HF's RoPE layout (NEOX: no permutation)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from qgplm.errors import QgplmError

TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # llama.cpp's GPT-2 uses the tanh GELU


@dataclass(frozen=True)
class GGUFArch:
    arch: str  # general.architecture
    blocks: str  # state-dict prefix of the transformer blocks
    fixed: dict[str, str]  # state-dict key -> GGUF name, outside the blocks
    per_layer: dict[str, str]  # module inside a block -> GGUF name
    hparams: Callable[[Any, Any, Any], None]  # (writer, gguf, config)
    check: Callable[[Any], list[str]]  # config -> notes; raises for what llama.cpp's graph does not compute
    permute_qk: bool = False
    ignored: tuple[str, ...] = field(default=())  # state-dict keys (suffixes) llama.cpp does not read

    def gguf_name(self, sd_key: str) -> str | None:
        """llama.cpp's tensor name of a state-dict key (None: no such tensor in llama.cpp's graph)."""
        if sd_key in self.fixed:
            return self.fixed[sd_key]
        if not sd_key.startswith(self.blocks):
            return None
        layer, _, rest = sd_key[len(self.blocks):].partition(".")
        module, _, leaf = rest.rpartition(".")
        if not layer.isdigit() or module not in self.per_layer:
            return None
        return f"blk.{layer}.{self.per_layer[module]}.{leaf}"

    def row_order(self, name: str, rows: int, config: Any) -> Tensor | None:
        """The row permutation of a tensor in the file (LlamaModel.permute for attn_q / attn_k)."""
        if not self.permute_qk or not name.endswith((".attn_q.weight", ".attn_q.bias", ".attn_k.weight",
                                                     ".attn_k.bias")):
            return None
        heads = config.num_attention_heads if ".attn_q." in name else _kv_heads(config)
        return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _kv_heads(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config: Any) -> dict[str, Any]:
    """{rope_theta, rope_type, factor...} of transformers 5 (rope_parameters) or 4 (rope_theta, rope_scaling)."""
    params = getattr(config, "rope_parameters", None)
    if not params:
        params = {"rope_theta": getattr(config, "rope_theta", 10000.0), **(getattr(config, "rope_scaling", None) or {})}
    return {"rope_type": params.get("rope_type", params.get("type", "default")), **params}


# ---------------------------------------------------------------- GPT-2


def _gpt2_hparams(writer: Any, gguf: Any, config: Any) -> None:
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


def _gpt2_check(config: Any) -> list[str]:
    if config.activation_function not in TANH_GELU:
        raise QgplmError(f"activation_function={config.activation_function!r}: llama.cpp's GPT-2 computes the "
                         f"tanh GELU ({', '.join(TANH_GELU)}); use format=onnx for this model")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn", False):
        raise QgplmError("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not in llama.cpp's "
                         "GPT-2: use format=onnx for this model")
    return []


GPT2 = GGUFArch(
    "gpt2", "transformer.h.",
    {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
     "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
     "lm_head.weight": "output.weight"},
    {"ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
     "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"},
    _gpt2_hparams, _gpt2_check, ignored=(".attn.bias", ".attn.masked_bias"))  # causal-mask buffers


# ---------------------------------------------------------------- Llama, Mistral, Qwen2


def _llama_hparams(writer: Any, gguf: Any, config: Any, llama_keys: bool = True) -> None:
    """TextModel.set_gguf_parameters' keys (+ LlamaModel's vocab size and rope dimension count)."""
    heads, head_dim, rope = config.num_attention_heads, _head_dim(config), _rope(config)
    writer.add_vocab_size(config.vocab_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(_kv_heads(config))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if head_dim * heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if llama_keys:
        writer.add_rope_dimension_count(head_dim)


def _swiglu_rope_check(config: Any) -> None:
    if config.hidden_act != "silu":
        raise QgplmError(f"hidden_act={config.hidden_act!r}: llama.cpp's graph computes SwiGLU with SiLU; use "
                         f"mode=lowbit for this model")
    rope = _rope(config)
    if rope["rope_type"] not in ("default", "linear"):
        raise QgplmError(f"rope_type={rope['rope_type']!r}: format=gguf writes default and linear RoPE only; use "
                         f"mode=lowbit for this model")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise QgplmError("partial_rotary_factor != 1: not in llama.cpp's llama graph; use mode=lowbit")


def _llama_check(config: Any) -> list[str]:
    _swiglu_rope_check(config)
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        return [f"sliding_window={window}: llama.cpp's llama graph attends over the whole context, so it matches "
                f"the student for sequences of up to {window} tokens (as llama.cpp's own converter)"]
    return []


def _qwen2_check(config: Any) -> list[str]:
    if getattr(config, "use_sliding_window", False):
        raise QgplmError("use_sliding_window=true: llama.cpp's qwen2 graph has no sliding window; use mode=lowbit")
    if _head_dim(config) * config.num_attention_heads != config.hidden_size:
        raise QgplmError("head_dim * num_attention_heads != hidden_size: llama.cpp's qwen2 graph needs them equal; "
                         "use mode=lowbit")
    _swiglu_rope_check(config)
    return []


_LLAMA_FIXED = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
_LLAMA_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}
LLAMA = GGUFArch("llama", "model.layers.", _LLAMA_FIXED, _LLAMA_LAYER, _llama_hparams, _llama_check, permute_qk=True)
QWEN2 = GGUFArch("qwen2", "model.layers.", _LLAMA_FIXED, _LLAMA_LAYER,
                 lambda w, g, c: _llama_hparams(w, g, c, llama_keys=False), _qwen2_check)

ARCHS = {"GPT2LMHeadModel": GPT2, "LlamaForCausalLM": LLAMA, "MistralForCausalLM": LLAMA, "Qwen2ForCausalLM": QWEN2}
SUPPORTED = {"GPT2LMHeadModel": "GPT-2 (GPT2LMHeadModel)", "LlamaForCausalLM": "Llama (LlamaForCausalLM)",
             "MistralForCausalLM": "Mistral (MistralForCausalLM)", "Qwen2ForCausalLM": "Qwen2 (Qwen2ForCausalLM)"}


def arch_of(model_class: str, config: Any = None) -> tuple[GGUFArch, list[str]]:
    """(layout, notes) of a model class; one line naming what is supported, for anything else."""
    if model_class not in ARCHS:
        raise QgplmError(f"format=gguf supports {', '.join(SUPPORTED.values())}, not {model_class}: use format=onnx "
                         f"(GPT-2 and BART) or mode=lowbit")
    arch = ARCHS[model_class]
    return arch, (arch.check(config) if config is not None else [])


__all__ = ["ARCHS", "GGUFArch", "GPT2", "LLAMA", "QWEN2", "SUPPORTED", "TANH_GELU", "arch_of"]
