"""Summarization (XSum, CNN/DailyMail) with encoder-decoder models: ROUGE of beam-search summaries.

Reading the data and batching it is qgplm.data.seq2seq's, ROUGE qgplm.tasks.evaluation's. Here: the
task's config, its tokenizer corpus (documents and summaries) and the summaries it reports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from qgplm.checks import choice, count_or_none, positive
from qgplm.data.seq2seq import Example, Seq2SeqDataModule
from qgplm.tasks.base import Task, TaskConfig
from qgplm.tasks.evaluation import GenerationConfig

log = logging.getLogger("qgplm")
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@dataclass
class SummarizationTaskConfig(TaskConfig):
    """Documents and reference summaries: `data_dir` (local files), the hub, or `offline_dir`."""

    _target_: str = "qgplm.tasks.summarization.Summarization"
    hub_path: str | None = None
    hub_name: str | None = None
    document_column: str = "document"  # the hub data set's columns
    summary_column: str = "summary"
    offline_dir: str | None = None  # data_dir=null and no hub: read this local sample instead
    valid_size: int | None = None  # a local sample without splits: examples held out for validation
    test_size: int | None = None  # ... and for test (the rest trains)
    max_train_examples: int | None = None
    max_eval_examples: int | None = None  # cap on validation and test examples
    max_source_length: int = 512  # document tokens (truncated)
    max_target_length: int = 64  # summary tokens (truncated)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    rouge_keys: list[str] = field(default_factory=lambda: ["rouge1", "rouge2", "rougeL"])

    def validate(self) -> None:
        super().validate()
        for key in ("max_source_length", "max_target_length"):
            positive(f"task.{key}", getattr(self, key))
        for key in ("valid_size", "test_size", "max_train_examples", "max_eval_examples"):
            count_or_none(f"task.{key}", getattr(self, key))
        for k in self.rouge_keys:
            choice("task.rouge_keys entry", k, ROUGE_KEYS)
        self.generation.validate()

    def sequence_lengths(self) -> list[tuple[str, int]]:
        return [("task.max_source_length", self.max_source_length),
                ("task.max_target_length", self.max_target_length),
                ("task.generation.max_length", self.generation.max_length)]


class Summarization(Task):
    """Test ROUGE of beam-search summaries (and PPL of the references); the first summaries of the
    last model trained go into metrics.json."""

    Config = SummarizationTaskConfig
    kind = "summarization"
    model_kind = "seq2seq"
    cfg: SummarizationTaskConfig

    def load(self) -> tuple[dict[str, list[Example]], str]:
        from qgplm.data.seq2seq import load_examples

        return load_examples(self.cfg)

    def tokenizer_corpus(self, data: tuple[dict[str, list[Example]], str]) -> list[str]:
        examples, _ = data
        return [t for e in examples["train"] for t in (e["document"], e["summary"])]

    def datamodule(self, tokenizer: Any, data: tuple[dict[str, list[Example]], str], seed: int) -> Seq2SeqDataModule:
        examples, source = data
        return Seq2SeqDataModule(self.cfg, tokenizer, examples, source, seed=seed)

    def evaluator(self, tokenizer: Any, dm: Seq2SeqDataModule) -> Any:
        from qgplm.tasks.evaluation import SummaryEvaluator

        return SummaryEvaluator(tokenizer, self.cfg.generation, self.cfg.rouge_keys, dm.examples["test"])

    @property
    def max_positions(self) -> int:
        """Generation's max_length is bounded by the model, not given to it."""
        return max(self.cfg.max_source_length, self.cfg.max_target_length)

    def report(self, samples: dict[str, list[dict[str, str]]], records: dict[str, list[dict[str, str]]],
               n: int) -> dict[str, Any]:
        if n <= 0 or not records:
            return {}
        who = "student" if "student" in records else "teacher"
        summaries = records[who][:n]
        for r in summaries:
            log.info("%s summary of %s: %s | reference: %s", who, r["id"], r["summary"], r["reference"])
        return {"summaries": {who: summaries}}
