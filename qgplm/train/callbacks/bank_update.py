"""MemoryBankCallback: owns the contrastive memory bank for the whole fit.

It creates the bank at set-up (vocab x hidden of the student), attaches it to the module,
applies the momentum update once per optimizer step, after it (with gradient accumulation the
micro-batches' updates are queued and written together: see `on_train_batch_end`),
gathering the valid (token id, query) pairs of every rank first so that all ranks hold the same
bank (`qgplm.train.distributed.gather_valid_rows`: the ranks' batches may be padded to different
lengths), and saves / restores the bank with Lightning checkpoints (callback state). With
`encoder=True` (seq2seq, distill.contrast_encoder) a second bank of the same shape serves the
encoder's contrast: encoder and decoder representations of a token differ, so they are not
averaged into one row.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from qgplm.distill import MemoryBank
from qgplm.train.distributed import gather_valid_rows


class MemoryBankCallback(Callback):
    def __init__(self, momentum: float = 0.5, encoder: bool = False):
        self.momentum, self.encoder = momentum, encoder
        self.bank: MemoryBank | None = None
        self.encoder_bank: MemoryBank | None = None
        self._pending: dict[str, Any] | None = None
        # updates of the micro-batches of the optimizer step in progress, written when it steps
        self._queued: dict[str, list] = {"bank": [], "encoder_bank": []}
        self._step_at_batch_start: int | None = None
        self.rank_checksums: list[list[float]] = []

    @property
    def state_key(self) -> str:
        return "MemoryBankCallback"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.bank is not None:
            return
        model = pl_module.student
        vocab = model.get_input_embeddings().num_embeddings
        self.bank = MemoryBank(vocab, model.config.hidden_size, self.momentum)
        if self.encoder:
            self.encoder_bank = MemoryBank(vocab, model.config.hidden_size, self.momentum)
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None
        pl_module.attach_memory_bank(self.bank, self.encoder_bank)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.bank.to(pl_module.device)
        if self.encoder_bank is not None:
            self.encoder_bank.to(pl_module.device)
        pl_module.attach_memory_bank(self.bank, self.encoder_bank)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._queued = {"bank": [], "encoder_bank": []}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        """Queue this micro-batch's update; write the queue when the optimizer has stepped.

        docs/method.md: after the step, M[t_i] <- stopgrad(q_i), one momentum update per training step.
        With `trainer.accumulate_grad_batches=k` a step is k micro-batches and one weight update, so
        the bank moves once per step too: every micro-batch queries the bank as it was at the step's
        start, and the step writes all k updates at once, a token seen in several micro-batches
        getting the mean of its queries, exactly what one batch of k times the size does. (Writing
        after each micro-batch would apply the momentum k times per step, mix one step's own
        representations into its later queries, and make the bank depend on k.)"""
        self._queued["bank"].append(pl_module.pop_bank_update())
        if self.encoder_bank is not None:
            self._queued["encoder_bank"].append(pl_module.pop_encoder_bank_update())
        if trainer.global_step == self._step_at_batch_start:
            return  # no optimizer step yet: a micro-batch of an accumulated step
        self._apply(trainer, self.bank, self._take("bank"))
        if self.encoder_bank is not None:
            self._apply(trainer, self.encoder_bank, self._take("encoder_bank"))

    def _take(self, key: str) -> Any:
        """The queued updates of one bank as one update (token ids [1, N], queries [1, N, H], mask
        [1, N]: all positions of the step as one sequence), None if there were none."""
        queued = [u for u in self._queued[key] if u is not None]
        self._queued[key] = []
        if len(queued) <= 1:
            return queued[0] if queued else None
        return tuple(torch.cat([t.reshape(-1, *t.shape[2:]) for t in parts]).unsqueeze(0)
                     for parts in zip(*queued, strict=True))

    @staticmethod
    def _apply(trainer: pl.Trainer, bank: MemoryBank | None, update: Any) -> None:
        if update is None or bank is None:
            return
        ids, queries, mask = update
        if trainer.world_size > 1:
            # identical bank on every rank: apply everybody's valid (id, query) pairs, in rank
            # order; only those are gathered, since the ranks' batches may be padded to
            # different lengths (seq2seq, Persona-Chat)
            ids, queries = gather_valid_rows(trainer.strategy, mask, ids, queries)
            mask = None
        bank.update(ids, queries, mask)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the invariant the gathered updates maintain: every rank holds the same bank.
        `rank_checksums` (one per rank) go into metrics.json; a mismatch is an error."""
        if self.bank is None:
            return
        b = self.bank.bank.detach().double()
        weights = torch.arange(1, b.shape[1] + 1, dtype=torch.float64, device=b.device)
        local = torch.stack([b.sum(), (b * b).sum(), (b * weights).sum()])
        sums = trainer.strategy.all_gather(local) if trainer.world_size > 1 else local.unsqueeze(0)
        self.rank_checksums = sums.reshape(-1, 3).cpu().tolist()
        if any(row != self.rank_checksums[0] for row in self.rank_checksums):
            raise RuntimeError(f"memory banks differ across ranks: {self.rank_checksums}")

    def state_dict(self) -> dict[str, Any]:
        out = {}
        for key, bank in (("bank", self.bank), ("encoder_bank", self.encoder_bank)):
            if bank is not None:
                out[key] = {k: v.detach().cpu().clone() for k, v in bank.state_dict().items()}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "bank" not in state_dict:
            return
        if self.bank is None:
            self._pending = state_dict
        else:
            self._load(state_dict)

    def _load(self, state: dict[str, Any]) -> None:
        for key, bank in (("bank", self.bank), ("encoder_bank", self.encoder_bank)):
            if bank is not None and key in state:
                bank.load_state_dict({k: v.to(bank.bank.device) for k, v in state[key].items()})
