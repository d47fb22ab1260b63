"""Perplexity that stays finite wherever the model's NLL is finite."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.text import Perplexity as _TorchmetricsPerplexity


class Perplexity(_TorchmetricsPerplexity):
    """torchmetrics' `Perplexity` (its states, distributed sum and `compute`), with each token's negative
    log-probability taken by `cross_entropy` (log-softmax) instead of softmax followed by log.

    Why: torchmetrics computes `softmax(logits)` and then `log` of the target's probability. Where a
    target's logit lies more than ~104 below the row's largest (its probability underflows fp32 to 0),
    that token scores -log(0) = inf and the whole perplexity becomes inf, though the model's NLL is
    finite. A badly quantized model (a 2-bit student early in training) can have such logit gaps, and an
    inf validation PPL stops training as diverged. The sums are kept in float64 for the same reason:
    exp(mean NLL) overflows fp32 above a mean NLL of 88.7 (a PPL of 3.4e38), float64 above 709.
    """

    def __init__(self, ignore_index: int | None = None, **kwargs: Any) -> None:
        super().__init__(ignore_index=ignore_index, **kwargs)
        self.add_state("total_log_probs", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.shape[:-1] != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} must be target {tuple(target.shape)} plus a vocabulary dim")
        ignore = -100 if self.ignore_index is None else self.ignore_index
        target = target.reshape(-1)
        nll = F.cross_entropy(preds.reshape(-1, preds.shape[-1]).float(), target, ignore_index=ignore,
                              reduction="sum")
        self.total_log_probs += nll.to(self.total_log_probs.dtype)
        self.count += (target != ignore).sum().to(self.count.dtype)
