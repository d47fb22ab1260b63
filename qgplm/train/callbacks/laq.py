"""LAQCurvatureCallback: feed LAQ quantizers the diagonal curvature estimate from Adam's state.

Before every training batch, for each quantized weight whose quantizer is LAQ, it reads the
optimizer's second moment v = state[weight]["exp_avg_sq"] and sets D = sqrt(v) + eps
(docs/method.md, "LAQ"). D is oriented as the quantizer sees the weight ([out, in]):
for GPT-2's Conv1D (stored [in, out]) it is transposed. Before the first optimizer step there is
no state yet and LAQ keeps D = identity. D only changes at an optimizer step, so it is set once per
step (at the first micro-batch of an accumulated step; setting it makes LAQ solve alpha again, and
LAQ solves alpha once per step: see LAQQuantizer). No bias correction is applied: alpha is invariant to a
uniform scaling of D (up to eps), so it would not change the result.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from qgplm.quant.api import oriented_weight, quantized_modules
from qgplm.quant.baselines import LAQQuantizer
from qgplm.quant.modules import QuantConv1D
from qgplm.train.fsdp import unsharded


class LAQCurvatureCallback(Callback):
    def __init__(self, eps: float = 1e-8):
        self.eps = eps
        self.updated = 0  # quantizers updated at the last batch (for tests and logging)
        self._step: int | None = None  # trainer.global_step D was last set at

    @torch.no_grad()
    def update(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Set D on every LAQ quantizer of `model` from `optimizer`'s state; returns how many."""
        count, seen = 0, set()
        for _, mod in quantized_modules(model):
            q = mod.weight_quantizer
            if not isinstance(q, LAQQuantizer) or id(q) in seen:
                continue
            seen.add(id(q))
            state = optimizer.state.get(mod.weight, {})
            v = state.get("exp_avg_sq") if isinstance(state, dict) else None
            if v is None:
                continue
            d = unsharded(v).sqrt() + self.eps  # trainer=fsdp2: v is a shard; every rank gathers it
            if isinstance(mod, QuantConv1D):
                d = d.t()
            if d.shape != oriented_weight(mod).shape:  # e.g. a sharded / flattened optimizer state
                continue
            q.set_curvature(d.contiguous())
            count += 1
        return count

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not trainer.optimizers:
            return
        step = getattr(trainer, "global_step", None)
        if step is not None and step == self._step:  # a later micro-batch of the same optimizer step
            return
        self._step = step
        self.updated = self.update(pl_module.model, trainer.optimizers[0])
