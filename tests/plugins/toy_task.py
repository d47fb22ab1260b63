"""A task kind defined outside the package: counting in words, scored by next-token accuracy.

It exists to prove that a task kind is one module plus one YAML (conf/task/toy.yaml beside it,
found through Hydra's search path): it brings its own config, data, datamodule, evaluator and
report entry, and qgplm/ knows nothing of it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from qgplm.checks import positive
from qgplm.data.token_stream import IGNORE_INDEX, TrainBlocks, tokenize_stream
from qgplm.tasks import Task, TaskConfig
from qgplm.tasks.base import BlockSized

NUMBERS = "zero one two three four five six seven eight nine".split()


@dataclass
class CountingConfig(BlockSized, TaskConfig):  # BlockSized: block_size must fit the positions
    _target_: str = "tests.plugins.toy_task.Counting"
    sentences: int = 200  # per split
    block_size: int = 16

    def validate(self) -> None:
        super().validate()
        positive("task.sentences", self.sentences)
        positive("task.block_size", self.block_size)


class CountingData(pl.LightningDataModule):
    def __init__(self, cfg: CountingConfig, tokenizer: Any, texts: dict[str, str]):
        super().__init__()
        self.cfg = cfg
        self.blocks = {s: TrainBlocks(tokenize_stream(tokenizer, t), cfg.block_size) for s, t in texts.items()}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.blocks["train"], batch_size=self.cfg.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.blocks["valid"], batch_size=self.cfg.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.blocks["test"], batch_size=self.cfg.eval_batch_size)

    def protocol(self) -> dict[str, Any]:
        return {"metric": "next-token accuracy (%) of counting runs", "blocks": {s: len(b) for s, b in
                                                                                self.blocks.items()}}


class NextTokenAccuracy:
    def __init__(self) -> None:
        self.correct = self.total = 0

    def reset(self) -> None:
        self.correct = self.total = 0

    @torch.no_grad()
    def update(self, model: Any, batch: dict[str, torch.Tensor]) -> None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        pred, tgt = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
        keep = tgt != IGNORE_INDEX
        self.correct += int((pred == tgt)[keep].sum())
        self.total += int(keep.sum())

    def compute(self) -> dict[str, float]:
        return {"next_token_accuracy": 100.0 * self.correct / max(1, self.total)}

    def records(self) -> list[dict[str, str]]:
        return []


class Counting(Task):
    """Counting in words ("three four five ..."): a corpus a 1-layer model learns in a few steps,
    scored by next-token accuracy; a causal task, Task's default model kind."""

    Config = CountingConfig
    kind = "counting"
    cfg: CountingConfig

    def load(self) -> dict[str, str]:
        rng = random.Random(self.cfg.corpus_seed)
        out = {}
        for split in ("train", "valid", "test"):
            lines = []
            for _ in range(self.cfg.sentences):
                start = rng.randrange(len(NUMBERS) - 3)
                lines.append(" ".join(NUMBERS[start : start + rng.randrange(3, len(NUMBERS) - start + 1)]) + " .\n")
            out[split] = "".join(lines)
        return out

    def tokenizer_corpus(self, data: dict[str, str]) -> str:
        return data["train"]

    def datamodule(self, tokenizer: Any, data: dict[str, str], seed: int) -> CountingData:
        return CountingData(self.cfg, tokenizer, data)

    def evaluator(self, tokenizer: Any, dm: CountingData) -> NextTokenAccuracy:
        return NextTokenAccuracy()

    def report(self, samples: dict[str, Any], records: dict[str, Any], n: int) -> dict[str, Any]:
        return {"counting": {"sentences_per_split": self.cfg.sentences}}
