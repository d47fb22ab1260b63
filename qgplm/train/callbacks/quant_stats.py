"""QuantStatsCallback: what a user watches during QAT, logged at every validation.

- `val/homogeneity_student`, `val/homogeneity_teacher`: mean pairwise cosine similarity of the
  last-layer (decoder) token representations on the first validation batch (qgplm.distill.metrics);
- `scales/<module>/alpha` (clipping threshold = step * levels) and `scales/<module>/gamma`
  (the learnable scale, where the quantizer has one), per quantized module;
- on W&B also the histograms `scales/alpha` and `scales/gamma` over all modules (and rows).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from qgplm.distill.metrics import token_homogeneity
from qgplm.quant.api import weight_quantizers
from qgplm.quant.functional import levels
from qgplm.train.fsdp import unsharded
from qgplm.train.loggers import wandb_runs


@torch.no_grad()
def scale_stats(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {"alpha": clipping threshold(s), "gamma": learnable scale(s)}} per weight quantizer."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, q, w in weight_quantizers(model):
        if not bool(q.initialized):
            continue
        _, step = q.codes(unsharded(w.detach()))  # trainer=fsdp2: the whole weight, gathered on every rank
        stats = {"alpha": (step * levels(q.bits)).flatten().float().cpu()}
        params = q.scale_parameters()
        if params:
            stats["gamma"] = torch.cat([p.detach().flatten().float().cpu() for p in params])
        out[name] = stats
    return out


class QuantStatsCallback(Callback):
    def __init__(self) -> None:
        self._homogeneity: dict[str, torch.Tensor] = {}
        self._frozen_teacher: torch.Tensor | None = None  # the QAT teacher never changes: measured once

    @torch.no_grad()
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or trainer.sanity_checking or "labels" not in batch:
            return
        from qgplm.train.module import model_forward

        def homogeneity(model: torch.nn.Module) -> torch.Tensor:
            out = model_forward(model, batch, layer=-1)  # last (decoder) layer, its token mask
            return token_homogeneity(out.hidden, out.mask)

        teacher = getattr(pl_module, "teacher", None)
        if teacher is None:  # the teacher stage: the model being trained is the teacher
            self._homogeneity["teacher"] = homogeneity(pl_module.model)
            return
        self._homogeneity["student"] = homogeneity(pl_module.model)
        if self._frozen_teacher is None:
            self._frozen_teacher = homogeneity(teacher)
        self._homogeneity["teacher"] = self._frozen_teacher

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for role, value in self._homogeneity.items():
            pl_module.log(f"val/homogeneity_{role}", value, sync_dist=True)
        self._homogeneity = {}
        stats = scale_stats(pl_module.model)
        for name, s in stats.items():
            for key, values in s.items():
                pl_module.log(f"scales/{name}/{key}", values.mean())
        runs = wandb_runs(trainer.loggers)
        if runs and stats and trainer.is_global_zero:
            import wandb

            hist = {f"scales/{key}": wandb.Histogram(torch.cat([s[key] for s in stats.values() if key in s]).numpy())
                    for key in ("alpha", "gamma") if any(key in s for s in stats.values())}
            for run in runs:
                run.log({**hist, "trainer/global_step": trainer.global_step})
