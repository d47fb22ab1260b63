"""What to quantize and how: the typed config consumed by `quantize_model`."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(kw_only=True)
class QuantRecipe:
    """How to quantize, whatever the bit-widths: shared by `QuantConfig` and the `method=` config
    group (`qgplm.train.config.MethodConfig`), so a method declares exactly the knobs `quantize_model` has.

    quantizer: a registered quantizer kind (`qgplm.quant.registry`), or the import path of a kind's
        class defined outside qgplm.
    quantizer_kwargs: passed to the quantizer's constructor (e.g. gamma_init, detach_mean).
    per_row: one scale per output row instead of one per tensor.
    activation_symmetric: symmetric 8-bit activations (else asymmetric min-max with a zero point).
    activation_granularity: "tensor" (the paper's: one dynamic range per activation tensor) or
        "token" (one per token, as torchao's int8 per-token activations; docs/method.md).
    include / exclude: regexes on module names (re.search); a module is swapped if it matches
        any include pattern (or include is empty) and no exclude pattern.
    quantize_attention: also quantize the inputs of the attention score and value matmuls to
        `activation_bits` (off by default: docs/method.md, "Activation quantizer").
    """

    quantizer: str = "quantgpt"
    quantizer_kwargs: dict[str, Any] = field(default_factory=dict)
    per_row: bool = False
    activation_symmetric: bool = False
    activation_granularity: str = "tensor"
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    quantize_attention: bool = False

    def recipe(self) -> dict[str, Any]:
        """The recipe fields as fresh keyword arguments (lists and dicts copied)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(QuantRecipe)}


@dataclass(kw_only=True)
class QuantConfig(QuantRecipe):
    """A recipe plus bit-widths. `None` bits keeps that part in full precision.

    weight_bits: Transformer linear / Conv1D weights (the "W" of WxEyAz).
    embedding_bits: the token embedding and the tied LM head (the "E").
    activation_bits: the input of every quantized linear layer and of the LM head (the "A").
    """

    weight_bits: int | None = 2
    embedding_bits: int | None = 2
    activation_bits: int | None = 8

    @property
    def tag(self) -> str:
        """Paper notation, e.g. W2E2A8; 'fp' parts are written as 32."""
        b = lambda v: 32 if v is None else v  # noqa: E731
        return f"W{b(self.weight_bits)}E{b(self.embedding_bits)}A{b(self.activation_bits)}"

    @property
    def is_full_precision(self) -> bool:
        return self.weight_bits is None and self.embedding_bits is None and self.activation_bits is None
