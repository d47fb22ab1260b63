"""What to quantize and how: the typed config consumed by `quantize_model`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class QuantConfig:
    """Bit-widths and quantizer choice. `None` bits keeps that part in full precision.

    weight_bits: Transformer linear / Conv1D weights (the "W" of WxEyAz).
    embedding_bits: the token embedding and the tied LM head (the "E").
    activation_bits: the input of every quantized linear layer and of the LM head (the "A").
    quantizer: registered weight quantizer name (`qgplm.quant.WEIGHT_QUANTIZERS`).
    quantizer_kwargs: passed to the quantizer's constructor (e.g. gamma_init, detach_mean).
    per_row: one scale per output row instead of one per tensor.
    include / exclude: regexes on module names (re.search); a module is swapped if it matches
        any include pattern (or include is empty) and no exclude pattern.
    quantize_attention: also quantize the inputs of the attention score and value matmuls to
        `activation_bits` (PAPER.md: off by default).
    """

    weight_bits: int | None = 2
    embedding_bits: int | None = 2
    activation_bits: int | None = 8
    quantizer: str = "quantgpt"
    quantizer_kwargs: dict[str, Any] = field(default_factory=dict)
    per_row: bool = False
    activation_symmetric: bool = False
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    quantize_attention: bool = False

    @property
    def tag(self) -> str:
        """Paper notation, e.g. W2E2A8; 'fp' parts are written as 32."""
        b = lambda v: 32 if v is None else v  # noqa: E731
        return f"W{b(self.weight_bits)}E{b(self.embedding_bits)}A{b(self.activation_bits)}"

    @property
    def is_full_precision(self) -> bool:
        return self.weight_bits is None and self.embedding_bits is None and self.activation_bits is None
