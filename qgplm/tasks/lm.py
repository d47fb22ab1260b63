"""Language modelling (WikiText, PTB, the builtin corpus): perplexity of a token stream.

The protocol itself (blocks, strided windows) is qgplm.data.token_stream's; where the text comes from is
qgplm.data.sources'. Here: the task's config, and the greedy continuations it adds to the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qgplm.checks import count_or_none, positive
from qgplm.data.token_stream import LMDataModule
from qgplm.errors import QgplmError
from qgplm.tasks.base import BlockSized, Task, TaskConfig

SAMPLE_PROMPT_TOKENS, SAMPLE_NEW_TOKENS = 12, 16  # generate_samples: prompt and continuation lengths


@dataclass
class LMTaskConfig(BlockSized, TaskConfig):
    """A language-modelling corpus: `data_dir` + `files` (split -> file), else the hub data set."""

    _target_: str = "qgplm.tasks.lm.LanguageModelling"
    hub_path: str | None = None
    hub_name: str | None = None
    text_column: str = "text"  # the hub data set's column holding the text
    block_size: int = 64
    eval_stride: int | None = None  # None: block_size - 1 (consecutive windows share one token)
    max_train_tokens: int | None = None
    max_eval_tokens: int | None = None

    def validate(self) -> None:
        super().validate()
        positive("task.block_size", self.block_size)
        for key in ("max_train_tokens", "max_eval_tokens"):
            count_or_none(f"task.{key}", getattr(self, key))
        if self.eval_stride is not None and not 0 < self.eval_stride < self.block_size:
            # consecutive windows must share a token: a window's first token is context only
            raise QgplmError(f"task.eval_stride must be in 1..block_size - 1 ({self.block_size - 1}), got "
                             f"{self.eval_stride}: lower it or leave it null (block_size - 1)")


class LanguageModelling(Task):
    """Test PPL of the split's token stream; greedy continuations of test prompts as samples."""

    Config = LMTaskConfig
    kind = "lm"
    cfg: LMTaskConfig

    def load(self) -> dict[str, str]:
        from qgplm.data.sources import load_texts

        return load_texts(self.cfg)

    def tokenizer_corpus(self, data: dict[str, str]) -> str:
        return data["train"]

    def datamodule(self, tokenizer: Any, data: dict[str, str], seed: int) -> LMDataModule:
        return LMDataModule(self.cfg, tokenizer, data, seed=seed)

    def check_positions(self, positions: int, generate_samples: int) -> None:
        super().check_positions(positions, generate_samples)
        need = SAMPLE_PROMPT_TOKENS + SAMPLE_NEW_TOKENS
        if generate_samples > 0 and need > positions:
            raise QgplmError(f"generate_samples={generate_samples} needs {need} positions "
                             f"({SAMPLE_PROMPT_TOKENS}-token prompts + {SAMPLE_NEW_TOKENS} new tokens) "
                             f"but the model has {positions}: set generate_samples=0")

    def samples(self, models: dict[str, Any], tokenizer: Any, dm: LMDataModule,
                n: int) -> dict[str, list[dict[str, str]]]:
        if n <= 0:
            return {}
        return {role: sample_generations(model, tokenizer, dm, n) for role, model in models.items()}


class BuiltinCorpus(LanguageModelling):
    """The embedded offline corpus (qgplm.data.builtin) with its own word-level tokenizer, so a
    default run needs no download and no tokenizer files."""

    def load(self) -> dict[str, str]:
        from qgplm.data.builtin import generate_corpus

        return generate_corpus(seed=self.cfg.corpus_seed)

    def own_tokenizer(self, data: dict[str, str]) -> Any:
        from qgplm.data.builtin import build_tokenizer

        return build_tokenizer(data["train"])


def sample_generations(model: torch.nn.Module, tokenizer: Any, dm: LMDataModule, n: int,
                       prompt_tokens: int = SAMPLE_PROMPT_TOKENS,
                       new_tokens: int = SAMPLE_NEW_TOKENS) -> list[dict[str, str]]:
    """Greedy continuations (HF generate) of `n` prompts spread evenly over the test stream."""
    out = []
    ids = dm.ids["test"]
    model.eval()
    for i in range(n):
        start = i * max(0, ids.numel() - prompt_tokens) // n
        prompt = ids[start : start + prompt_tokens].unsqueeze(0).to(model.device)
        with torch.no_grad():
            gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append({"prompt": tokenizer.decode(prompt[0]), "continuation": tokenizer.decode(gen[0, prompt_tokens:])})
    return out
