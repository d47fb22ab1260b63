"""Language-modelling datamodule: one token stream per split, cut into fixed blocks.

Protocol (also written into metrics.json by `protocol()`):
- each split's text is tokenized line by line (newlines kept) and the ids concatenated;
- training uses non-overlapping blocks of `block_size` tokens, shuffled each epoch;
- evaluation uses windows of `block_size` tokens advancing by `eval_stride` (at most
  block_size - 1, so consecutive windows share at least one token); each window scores only the
  tokens not scored by the previous one (the first window scores all but its first token), the
  last window is aligned to the end of the stream, so every token after the first is scored
  exactly once; PPL = exp(mean token NLL) over the split.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from qgplm.data.sampling import loader_options, resumable_loader
from qgplm.data.settings import LMSettings
from qgplm.errors import QgplmError

IGNORE_INDEX = -100


def tokenize_stream(tokenizer: Any, text: str, batch_lines: int = 4096) -> torch.Tensor:
    """Token ids of `text`, tokenized line by line (newlines kept), as one 1-D LongTensor."""
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    for i in range(0, len(lines), batch_lines):
        enc = tokenizer(lines[i : i + batch_lines], add_special_tokens=False)["input_ids"]
        for row in enc:
            ids.extend(row)
    return torch.tensor(ids, dtype=torch.long)


class TrainBlocks(Dataset):
    def __init__(self, ids: torch.Tensor, block_size: int):
        n = ids.numel() // block_size
        self.blocks = ids[: n * block_size].view(n, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.blocks[i]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}


class EvalWindows(Dataset):
    """Strided evaluation windows with labels masked where a token was already scored."""

    def __init__(self, ids: torch.Tensor, block_size: int, stride: int):
        n = ids.numel()
        self.ids, self.block = ids, block_size
        stride = min(stride, block_size - 1)  # a window's first token is context only
        starts = list(range(0, n - block_size + 1, stride))
        if starts[-1] + block_size < n:
            starts.append(n - block_size)
        self.starts = starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.starts[i]
        x = self.ids[s : s + self.block]
        labels = x.clone()
        if i > 0:
            prev_end = self.starts[i - 1] + self.block
            labels[: prev_end - s] = IGNORE_INDEX  # already scored by the previous window
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels}


class LMDataModule(pl.LightningDataModule):
    """Blocks for training and strided windows for validation/test, from raw split texts."""

    def __init__(self, task: LMSettings, tokenizer: Any, texts: dict[str, str], seed: int = 0):
        super().__init__()
        self.task, self.tokenizer, self.seed = task, tokenizer, seed
        self.ids: dict[str, torch.Tensor] = {}
        for split, text in texts.items():
            ids = tokenize_stream(tokenizer, text)
            limit = task.max_train_tokens if split == "train" else task.max_eval_tokens
            if limit is not None:
                ids = ids[:limit]
            if ids.numel() < task.block_size + 1:
                raise QgplmError(
                    f"{task.name} {split} split has {ids.numel()} tokens, fewer than one block "
                    f"(task.block_size={task.block_size}) + 1: lower task.block_size or give more data")
            self._check_known(split, ids)
            self.ids[split] = ids
        self.stride = task.eval_stride or task.block_size

    def _check_known(self, split: str, ids: torch.Tensor, max_unknown: float = 0.5) -> None:
        """Mostly <unk>: the tokenizer (with stage=quantize, the teacher's) was built for other text."""
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if unk is None or unk == getattr(self.tokenizer, "eos_token_id", None):  # GPT-2: unk is <|endoftext|>
            return
        frac = float((ids == unk).float().mean())
        if frac > max_unknown:
            raise QgplmError(
                f"{frac:.0%} of the {self.task.name} {split} tokens are unknown ({self.tokenizer.unk_token}) to the "
                f"tokenizer, which was built for other text (with stage=quantize: the teacher's): use a teacher "
                f"trained on task={self.task.name} (stage=teacher or pipeline)")

    def train_dataloader(self) -> DataLoader:
        ds = TrainBlocks(self.ids["train"], self.task.block_size)
        return resumable_loader(ds, self.task.batch_size, self.seed, self.task.num_workers,
                                getattr(self, "trainer", None))

    def _eval_loader(self, split: str) -> DataLoader:
        ds = EvalWindows(self.ids[split], self.task.block_size, self.stride)
        return DataLoader(ds, batch_size=self.task.eval_batch_size,
                          **loader_options(getattr(self, "trainer", None), self.task.num_workers))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def protocol(self) -> dict[str, Any]:
        return {
            "metric": "perplexity = exp(mean NLL of every token after the first)",
            "tokenization": "line by line, newlines kept, ids concatenated",
            "block_size": self.task.block_size,
            "eval_stride": min(self.stride, self.task.block_size - 1),
            "tokens": {k: int(v.numel()) for k, v in self.ids.items()},
            "split": "test (final figures), valid (model selection)",
        }
