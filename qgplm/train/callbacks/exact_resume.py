"""Callbacks for exact resume and for testing it.

`RNGStateCallback` puts every random-number generator's state in each checkpoint and restores
it right before the first training batch after a resume: dropout (and random contrastive
negatives) then draw the same numbers as in the uninterrupted run. Restoring any earlier would
not work: Lightning and the data loaders may draw from the global generator between restoring
a checkpoint and the first batch.

`KillAtStepCallback` sends SIGKILL to its own process after the checkpoint of a given step is
written: a real crash at a reproducible point, used by the resume test (and by anyone checking
their own resume path): `QGPLM_KILL_AT_STEP=<step>` (any stage) or `<stage>:<step>` (stage
teacher or student).
"""

from __future__ import annotations

import os
import random
import signal
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

KILL_ENV = "QGPLM_KILL_AT_STEP"


def rng_states() -> dict[str, Any]:
    """Every generator's state, as tensors and plain Python values only (loadable with
    torch.load(weights_only=True), which Lightning uses)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                                        float(gauss))}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGStateCallback(Callback):
    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None


class KillAtStepCallback(Callback):
    """SIGKILL this process at the first training batch after a checkpoint of step >= `step`
    was written (ModelCheckpoint runs last among callbacks, so killing in the same hook would
    come before the save)."""

    def __init__(self, step: int):
        self.step = step
        self._armed = False

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._armed = self._armed or trainer.global_step >= self.step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._armed:
            os.kill(os.getpid(), signal.SIGKILL)

    @staticmethod
    def from_env(stage: str) -> KillAtStepCallback | None:
        value = os.environ.get(KILL_ENV, "")
        if not value:
            return None
        want, _, step = value.rpartition(":")
        return KillAtStepCallback(int(step)) if want in ("", stage) else None
