"""ThroughputCallback: tokens per second of a stage's training steps, for its metrics.json.

Why not Lightning's ThroughputMonitor: it logs a sliding window to the loggers (none with
logger=none) and needs a FLOP count; a run's figures live in metrics.json, and what a reader wants
there is one number per stage: how fast the training steps went.

What is timed: each training batch from `on_train_batch_start` to `on_train_batch_end` (forward,
backward, optimizer step and the method's per-step callbacks such as the memory bank update), with
the device synchronized at both ends so that queued CUDA kernels are counted in the step that
launched them. Validation, checkpointing and data loading between steps are left out. The first
`skip` batches (CUDA context, kernel selection, allocator warm-up) are left out too when more than
2 x `skip` batches ran; in shorter runs (fast_dev_run, smoke tests) every batch counts.

Tokens are the attention mask's ones (the tokens the model read: block x batch for language
modelling; source tokens for seq2seq). Counted on this process and multiplied by the world size
(every rank trains equal batches), so `tokens_per_s` is the whole job's rate. A resumed stage
reports the steps run since the resume.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


def batch_tokens(batch: Any) -> int:
    """Tokens a training batch feeds the model: its attention mask's ones, else its input ids' count."""
    if isinstance(batch, dict):
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        if "input_ids" in batch:
            return batch["input_ids"].numel()
    raise ValueError("a training batch without attention_mask or input_ids: cannot count its tokens")


class ThroughputCallback(Callback):
    def __init__(self, skip: int = 3):
        self.skip = skip
        self.steps: list[tuple[float, int]] = []  # (seconds, tokens) of every training batch of this fit
        # (a batch is an optimizer step unless trainer.accumulate_grad_batches > 1)
        self._t0: float | None = None
        self.world_size = 1

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.steps, self._t0, self.world_size = [], None, trainer.world_size

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._t0 is None:
            return
        self._sync(pl_module)
        self.steps.append((time.perf_counter() - self._t0, batch_tokens(batch)))
        self._t0 = None

    def figures(self) -> dict[str, Any] | None:
        """{"tokens_per_s", "batch_s", "batches_timed", "batches_skipped", "tokens", "seconds", "world_size"},
        or None when no training batch ran (a teacher with 0 steps, a stage loaded from disk)."""
        if not self.steps:
            return None
        skipped = self.skip if len(self.steps) > 2 * self.skip else 0
        timed = self.steps[skipped:]
        seconds = sum(s for s, _ in timed)
        tokens = sum(n for _, n in timed) * self.world_size
        return {"tokens_per_s": tokens / seconds if seconds > 0 else None, "batch_s": seconds / len(timed),
                "batches_timed": len(timed), "batches_skipped": skipped, "tokens": tokens, "seconds": seconds,
                "world_size": self.world_size}
