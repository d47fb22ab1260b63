"""Persona-Chat next-utterance prediction for causal LMs (GPT-2), from the ConvAI2 / HF JSON.

Input: `<task.data_dir>/personachat_self_original.json` (HF's transfer-learning-conv-ai release;
`task.files.json=<name>` for another file name), shaped
    {"train": [dialog, ...], "valid": [dialog, ...]}
    dialog = {"personality": [sentence, ...],
              "utterances": [{"history": [turn, ...], "candidates": [reply, ..., gold]}, ...]}
The gold reply is the last candidate.

Splits: test = the file's "valid" dialogs (the standard evaluation set; a "test" key is used if
present); validation (model selection) = `task.valid_size` dialogs held out of "train"
(deterministic shuffle with task.corpus_seed); train = the remaining train dialogs.

Sequence layout (ids concatenated): persona sentences joined by spaces, <eos>, each history turn
(the last 2 * task.max_history + 1) followed by <eos>, then the reply followed by <eos>; the
context is truncated from the left to fit `task.block_size`.
- Training: context + gold reply, language modelling on every token (the teacher learns the
  dialogue domain; the student distils every position).
- Evaluation: one row per candidate (the last `task.num_candidates`, gold included), labels only
  on the reply tokens; the gold reply's PPL is the validation metric, and test accuracy = the
  gold candidate has the highest mean token log-likelihood (qgplm.tasks.evaluation.RankingEvaluator).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from qgplm.data.examples import ExampleDataModule
from qgplm.data.settings import PersonaChatSettings
from qgplm.data.token_stream import IGNORE_INDEX
from qgplm.errors import QgplmError

DEFAULT_FILE = "personachat_self_original.json"


def load_dialogs(task: PersonaChatSettings) -> dict[str, list[dict[str, Any]]]:
    if task.data_dir is None:
        raise QgplmError(f"task={task.name} reads the ConvAI2 JSON ({DEFAULT_FILE}): pass task.data_dir=<folder "
                         f"holding it> (see docs/usage.md, Persona-Chat)")
    root = Path(task.data_dir).expanduser()
    path = root / task.files.get("json", DEFAULT_FILE)
    if not path.is_file():
        raise QgplmError(f"missing {path}: pass task.data_dir=<folder with {DEFAULT_FILE}> or "
                         f"task.files.json=<file name>")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise QgplmError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict) or "train" not in data or "valid" not in data:
        raise QgplmError(f"{path} must be an object with 'train' and 'valid' lists of dialogs (ConvAI2 format)")
    for split in data:
        for n, d in enumerate(data[split]):
            if not isinstance(d, dict) or "personality" not in d or "utterances" not in d or any(
                    "history" not in u or "candidates" not in u or not u["candidates"] for u in d["utterances"]):
                raise QgplmError(f"{path}: {split}[{n}] needs personality and utterances[].history/.candidates "
                                 f"(ConvAI2 format, gold reply last)")
    n_valid = task.valid_size or 0
    train = list(data["train"])
    random.Random(task.corpus_seed).shuffle(train)
    if not 0 < n_valid < len(train):
        raise QgplmError(f"task.valid_size={task.valid_size} must hold out 1..{len(train) - 1} of the "
                         f"{len(train)} train dialogs for validation")
    return {"train": train[n_valid:], "valid": train[:n_valid], "test": list(data.get("test", data["valid"]))}


class PersonaChatDataModule(ExampleDataModule):
    def __init__(self, task: PersonaChatSettings, tokenizer: Any, dialogs: dict[str, list[dict[str, Any]]],
                 seed: int = 0):
        super().__init__()
        self.task, self.tok, self.seed = task, tokenizer, seed
        if tokenizer.eos_token_id is None:
            raise QgplmError("task=personachat needs a tokenizer with an eos token (used as the turn separator)")
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.turns = {s: self._turns(d, s) for s, d in dialogs.items()}
        for split, turns in self.turns.items():
            if not turns:
                raise QgplmError(f"task {task.name}: the {split} split has no utterances")

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _turns(self, dialogs: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
        """One entry per utterance: context ids and candidate reply ids (gold last)."""
        keep = 2 * self.task.max_history + 1
        k = self.task.num_candidates
        out = []
        for d in dialogs:
            persona = self._ids(" ".join(d["personality"])) + [self.eos]
            for u in d["utterances"]:
                ctx = list(persona)
                for turn in u["history"][-keep:]:
                    ctx += self._ids(turn) + [self.eos]
                cands = u["candidates"] if split != "train" else u["candidates"][-1:]
                if k is not None and split != "train":
                    cands = cands[-k:]
                out.append({"context": ctx, "candidates": [self._ids(" " + c) + [self.eos] for c in cands]})
        limit = self.task.max_train_examples if split == "train" else self.task.max_eval_examples
        return out[:limit] if limit is not None else out

    def _row(self, ctx: list[int], reply: list[int]) -> tuple[list[int], int]:
        """(ids, number of context tokens) with the context cut from the left to fit block_size."""
        reply = reply[: self.task.block_size // 2]
        ctx = ctx[max(0, len(ctx) + len(reply) - self.task.block_size):]
        return ctx + reply, len(ctx)

    def _pad(self, rows: list[list[int]], labels: list[list[int]]) -> dict[str, torch.Tensor]:
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), self.pad if self.pad is not None else self.eos, dtype=torch.long)
        lab = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
        attn = torch.zeros((len(rows), n), dtype=torch.long)
        for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
            ids[i, : len(r)] = torch.tensor(r)
            lab[i, : len(lb)] = torch.tensor(lb)
            attn[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": attn, "labels": lab}

    def collate_train(self, turns: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [self._row(t["context"], t["candidates"][-1])[0] for t in turns]
        return self._pad(rows, rows)

    def collate_eval(self, turns: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows, labels, group, gold = [], [], [], []
        for g, t in enumerate(turns):
            for c, reply in enumerate(t["candidates"]):
                ids, n_ctx = self._row(t["context"], reply)
                rows.append(ids)
                labels.append([IGNORE_INDEX] * n_ctx + ids[n_ctx:])
                group.append(g)
                gold.append(c == len(t["candidates"]) - 1)
        batch = self._pad(rows, labels)
        batch["group"] = torch.tensor(group)
        batch["gold"] = torch.tensor(gold)
        return batch

    def rows(self, split: str) -> list[dict[str, Any]]:
        return self.turns[split]

    def protocol(self) -> dict[str, Any]:
        cands = {s: sum(len(t["candidates"]) for t in v) / max(1, len(v))
                 for s, v in self.turns.items() if s != "train"}
        return {
            "metric": "accuracy (%) = gold candidate (the last) has the highest mean token log-likelihood given "
                      "persona + history; PPL of the gold reply tokens (validation / model selection)",
            "turns": {k: len(v) for k, v in self.turns.items()},
            "mean_candidates": cands,
            "max_history": self.task.max_history,
            "block_size": self.task.block_size,
            "split": "test = the file's valid dialogs; valid = task.valid_size train dialogs held out",
        }
