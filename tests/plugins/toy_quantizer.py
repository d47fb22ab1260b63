"""A quantizer defined outside qgplm, as a user would add one: this module plus one method file
(tests/plugins/conf/method/toy.yaml, found through Hydra's search path). Nothing under qgplm/
knows about it; `method.quantizer=tests.plugins.toy_quantizer.ToyQuantizer` imports this module,
whose decorator registers the kind with the callback it needs.

The rule: alpha = scale * mean|w| (a fixed multiple, nothing learnt), codes = round(clip(w/alpha) * n),
w_q = codes * alpha / n, straight-through gradient to w.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from qgplm.quant import WeightQuantizer, register_weight_quantizer
from qgplm.quant.baselines import IdentitySTE
from qgplm.quant.functional import levels


class ToyBatchCounter(Callback):
    """The toy kind's own callback: counts training batches, saved in the checkpoint (so a test can
    see that training with this kind ran it)."""

    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.batches += 1

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches = state_dict["batches"]


@register_weight_quantizer("toy", callbacks=lambda: [ToyBatchCounter()])
class ToyQuantizer(WeightQuantizer):
    def __init__(self, bits: int, num_rows: int | None = None, scale: float = 2.0):
        super().__init__(bits, num_rows)
        self.scale = scale

    @torch.no_grad()
    def codes(self, w: Tensor) -> tuple[Tensor, Tensor]:
        n = levels(self.bits)
        mean = w.abs().mean(dim=-1, keepdim=True) if self.per_row else w.abs().mean()
        alpha = (self.scale * mean).clamp_min(1e-8)
        return torch.round(torch.clamp(w / alpha, -1, 1) * n), alpha / n

    def quantize(self, w: Tensor) -> Tensor:
        codes, step = self.codes(w.detach())
        return IdentitySTE.apply(w, codes, step)  # forward exactly codes * step, as exported

    @torch.no_grad()
    def initialize(self, w: Tensor) -> None:
        self.initialized.fill_(True)
