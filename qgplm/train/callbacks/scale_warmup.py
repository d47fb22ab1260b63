"""ScaleWarmupCallback: initialise the quantizer scales at fit start, optionally warm them up.

- At set-up of a fresh fit (before any sharding or device move) every weight quantizer not yet
  initialised gets its scale from its weight (QuantGPT: the MSE-optimal gamma). Quantizers
  restored from a checkpoint carry `initialized=True` and are left alone, so resuming never
  re-calibrates.
- `hold_steps`: the scales get no update for the first steps (their gradients are dropped),
  letting the weights adapt to the initial quantization grid first.
- `ramp_steps`: quantization is blended in linearly, w + r * (Q(w) - w) with r going 1/ramp..1.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from qgplm.quant import initialize_quantizers, scale_parameters
from qgplm.quant.quantizers import WeightQuantizer


class ScaleWarmupCallback(Callback):
    def __init__(self, hold_steps: int = 0, ramp_steps: int = 0):
        self.hold_steps, self.ramp_steps = hold_steps, ramp_steps
        self.initialized_count = 0
        self._mix: float | None = None  # the factor last set (None: not yet in this fit)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mix = None  # a new fit (or a resumed one) sets it again at its first batch

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Initialise here, before the strategy wraps or moves the model: under FSDP the
        parameters are sharded from then on, and mean|w| / the MSE search of a shard (a flat slice
        of another shape on each rank) would be wrong. A resumed fit also computes them here (the
        checkpoint path is not known yet at this hook); the checkpoint's scales and `initialized`
        flags are restored afterwards and replace them (under FSDP after wrapping, so nothing is
        initialised later, from sharded weights)."""
        if stage == "fit":
            self.initialized_count = initialize_quantizers(pl_module.model)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        """Set the ramp-in factor when it changes (during the ramp, and once at the first batch),
        not at every step: a walk over all modules is host work each training step would pay."""
        mix = 1.0 if self.ramp_steps <= 0 else min(1.0, (trainer.global_step + 1) / self.ramp_steps)
        if mix == self._mix:
            return
        self._mix = mix
        for m in pl_module.model.modules():
            if isinstance(m, WeightQuantizer):
                m.mix = mix

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if trainer.global_step < self.hold_steps:
            for p in scale_parameters(pl_module.model):
                p.grad = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for m in pl_module.model.modules():  # evaluation and export always see full quantization
            if isinstance(m, WeightQuantizer):
                m.mix = 1.0
