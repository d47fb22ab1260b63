"""Which positions of the current forward are real tokens: the activation statistics skip padding.

Dynamic min-max activation quantization takes its range over a whole tensor. Pad positions must
not count, or a real token's output would depend on how much padding its batch carries (and so
ROUGE, Persona-Chat accuracy or any padded evaluation on how examples were batched).

`install_token_mask_hooks(model)` (run by `quantize_model` and by `load_quantized` in both modes)
adds forward hooks that read each forward's attention mask and make it the *current token mask*
while that forward runs:

- on the model itself: `attention_mask` of a causal LM, `decoder_attention_mask` of an
  encoder-decoder (the LM head sees the decoder's tokens);
- on its encoder: `attention_mask`;
- on its decoder / base model: `attention_mask`, and `encoder_attention_mask` for the tensor
  `encoder_hidden_states` itself: cross-attention computes its keys and values from that very
  tensor object, so an activation that *is* it gets the encoder's mask (`x is source`), every
  other activation the decoder's.

An activation with T token positions ([B, T, D], or [B*T, D] for models that flatten) takes the
*last* T columns of the [B, L] mask: a KV-cached step gets the mask of past + new tokens (the new
ones are last), and an LM head restricted by `logits_to_keep` the last positions. An activation
whose shape matches neither is quantized over the whole tensor, as is everything when no mask is
set (no hook, no attention_mask) or the mask has no padding. A tensor with no real token at all
falls back to the whole tensor too.

Readers: `ActivationQuantizer` (fake quantization in training, evaluation, generation and the
`dequantize` export mode), `Int8Linear` (the `int8` export mode) and the quantized attention,
all through `activation_mask(x)` and the one rounding rule `minmax_activation_codes(..., mask=)`.
Another kernel that needs the real rows of an activation calls `activation_mask(x)` (None: all
rows real) with the tensor the layer was called with; `current_token_mask()` gives the raw frame.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class TokenMask:
    """The real tokens of the forward that is running: `mask` [B, L] for its own tokens and
    `source_mask` [B, S] for the tensor `source` (the encoder states a decoder attends to).
    None = no padding (every position real)."""

    mask: Tensor | None = None
    source: Tensor | None = None
    source_mask: Tensor | None = None


_local = threading.local()


def _stack() -> list[TokenMask]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def current_token_mask() -> TokenMask | None:
    """The innermost frame set by a hooked forward or `token_mask`, or None outside any."""
    stack = _stack()
    return stack[-1] if stack else None


def _as_token_mask(m: Any) -> Tensor | None:
    """A [B, L] padding mask as bool, None when absent, not 2-D (a custom 4-D mask) or all real."""
    if not isinstance(m, Tensor) or m.dim() != 2:
        return None
    m = m != 0
    return None if bool(m.all()) else m


@contextlib.contextmanager
def token_mask(mask: Tensor | None, source: Tensor | None = None,
               source_mask: Tensor | None = None) -> Iterator[TokenMask]:
    """Make `mask` ([B, L], 1 = real token) the current token mask inside the block (what the
    hooks do for each forward; for code that calls quantized layers by hand)."""
    frame = TokenMask(_as_token_mask(mask), source, _as_token_mask(source_mask))
    _stack().append(frame)
    try:
        yield frame
    finally:
        _stack().pop()


def align_mask(mask: Tensor | None, lead: tuple[int, ...]) -> Tensor | None:
    """The [B, L] `mask` for an activation whose leading (token) dims are `lead`: [B, T] takes the
    last T columns, [B*T] the same flattened; None when the shapes do not fit."""
    if mask is None:
        return None
    b, length = mask.shape
    if len(lead) == 2 and lead[0] == b and lead[1] <= length:
        return mask[:, length - lead[1]:]
    if len(lead) == 1 and b and lead[0] % b == 0 and 0 < lead[0] // b <= length:
        return mask[:, length - lead[0] // b:].reshape(-1)
    return None


def activation_mask(x: Tensor) -> Tensor | None:
    """Bool mask of shape x.shape[:-1] (True = a real token's row) for an activation `x` a layer
    was called with, from the current frame; None = quantize over the whole tensor."""
    frame = current_token_mask()
    if frame is None:
        return None
    mask = frame.source_mask if frame.source is not None and x is frame.source else frame.mask
    return align_mask(mask, tuple(x.shape[:-1]))


def allowed_keys(attention_mask: Tensor | None) -> Tensor | None:
    """Boolean [B, 1|H, T, S] of a 4-D attention mask (additive: 0 where allowed, the dtype's
    minimum where masked; or boolean); None when there is none."""
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if attention_mask.is_floating_point():
        return attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return attention_mask != 0


def attention_masks(query: Tensor, allowed: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(real queries [B, T], real keys [B, S]) inside an attention call, `allowed` from
    `allowed_keys`: the queries are the current tokens; a key is real when some real query may see
    it (so pad keys, masked for every row, are not, in self- and cross-attention alike).
    None = all real."""
    frame = current_token_mask()
    if frame is None:
        return None, None
    q = align_mask(frame.mask, (query.shape[0], query.shape[-2]))
    if allowed is None:
        return q, None
    if q is not None:
        allowed = allowed & q[:, None, :, None]
    k = allowed.any(dim=-2).any(dim=1)  # [B, S]
    return q, (None if bool(k.all()) else k)


# ----------------------------------------------------------------------------- hooks
_ARGS = "_qgplm_token_mask_args"  # (mask kwarg, source kwarg, source-mask kwarg) a hooked module reads


@functools.cache
def _positions(cls: type) -> dict[str, int]:
    try:
        params = list(inspect.signature(cls.forward).parameters)[1:]  # without self
    except (TypeError, ValueError):
        return {}
    return {name: i for i, name in enumerate(params)}


def _arg(module: nn.Module, args: tuple, kwargs: dict, name: str | None) -> Any:
    if name is None:
        return None
    if name in kwargs:
        return kwargs[name]
    i = _positions(type(module)).get(name)
    return args[i] if i is not None and i < len(args) else None


def _push(module: nn.Module, args: tuple, kwargs: dict) -> None:
    mask_name, source_name, source_mask_name = getattr(module, _ARGS)
    source = _arg(module, args, kwargs, source_name)
    frame = TokenMask(_as_token_mask(_arg(module, args, kwargs, mask_name)),
                      source if isinstance(source, Tensor) else None,
                      _as_token_mask(_arg(module, args, kwargs, source_mask_name)))
    _stack().append(frame)


def _pop(module: nn.Module, args: tuple, output: Any) -> None:
    stack = _stack()
    if stack:
        stack.pop()


def _hook(module: nn.Module, names: tuple[str | None, str | None, str | None]) -> None:
    if getattr(module, _ARGS, None) is not None:
        return  # already hooked (a submodule reachable under two roles, or a second install)
    object.__setattr__(module, _ARGS, names)
    module.register_forward_pre_hook(_push, with_kwargs=True)
    module.register_forward_hook(_pop, always_call=True)  # popped even when the forward raises


def _submodule(model: nn.Module, getter: str) -> nn.Module | None:
    get = getattr(model, getter, None)
    try:
        sub = get() if callable(get) else None
    except (AttributeError, NotImplementedError, TypeError):
        return None
    return sub if isinstance(sub, nn.Module) and sub is not model else None


def install_token_mask_hooks(model: nn.Module) -> nn.Module:
    """Hook `model`, its encoder and its decoder / base model so that every forward sets the
    current token mask from its attention mask (see the module docstring). Idempotent; the hooks
    are module-level functions, so they survive `copy.deepcopy` and pickling."""
    enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    stream = ("attention_mask", "encoder_hidden_states", "encoder_attention_mask")
    encoder = _submodule(model, "get_encoder") if enc_dec else None
    if encoder is not None:
        _hook(encoder, ("attention_mask", None, None))
    _hook(model, ("decoder_attention_mask", None, None) if enc_dec else stream)
    decoder = _submodule(model, "get_decoder")
    if decoder is not None and decoder is not encoder:
        _hook(decoder, stream)
    base = getattr(model, "base_model", None)
    if not enc_dec and isinstance(base, nn.Module) and base is not model:
        _hook(base, stream)  # a causal LM's transformer (called by hand for hidden states, say)
    return model
