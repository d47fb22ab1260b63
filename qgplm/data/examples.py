"""The loaders shared by the example-based tasks (summarization, Persona-Chat).

Training is shuffled by the resumable sampler (an interrupted run continues with the same
batches); validation and test keep the split's order so that outputs line up with their
references. Subclasses say which rows a split has and how rows become a batch.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from qgplm.data.sampling import loader_options, resumable_loader


class ExampleDataModule(pl.LightningDataModule):
    """train/val/test loaders over `rows(split)`, batched by `collate_train` / `collate_eval`.
    Needs `self.task` (batch sizes, workers) and `self.seed`."""

    task: Any
    seed: int

    def rows(self, split: str) -> list[Any]:
        raise NotImplementedError

    def collate_train(self, rows: list[Any]) -> dict[str, Any]:
        raise NotImplementedError

    def collate_eval(self, rows: list[Any]) -> dict[str, Any]:
        return self.collate_train(rows)

    def train_dataloader(self) -> DataLoader:
        return resumable_loader(self.rows("train"), self.task.batch_size, self.seed, self.task.num_workers,
                                getattr(self, "trainer", None), drop_last=False, collate_fn=self.collate_train)

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self.rows(split), batch_size=self.task.eval_batch_size, collate_fn=self.collate_eval,
                          **loader_options(getattr(self, "trainer", None), self.task.num_workers))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
