"""What the data layer reads from a task's config, as structural types.

The task configs themselves live with their task kinds (`qgplm/tasks/`), one layer up; the
readers and datamodules here accept anything with these attributes, so the data layer never
imports the tasks above it (each `qgplm.tasks.*TaskConfig` dataclass satisfies its protocol)."""

from __future__ import annotations

from typing import Any, Protocol


class Source(Protocol):
    """Where a task's files come from."""

    name: str
    data_dir: str | None
    files: dict[str, str]
    hub_path: str | None
    hub_name: str | None


class LMSettings(Source, Protocol):
    """A language-modelling corpus: one text column, cut into blocks."""

    text_column: str
    block_size: int
    eval_stride: int | None
    batch_size: int
    eval_batch_size: int
    max_train_tokens: int | None
    max_eval_tokens: int | None
    num_workers: int


class PersonaChatSettings(Protocol):
    """Persona-Chat dialogs, split and ranked among candidates."""

    name: str
    data_dir: str | None
    files: dict[str, str]
    block_size: int
    corpus_seed: int
    max_history: int
    num_candidates: int | None
    valid_size: int
    max_train_examples: int | None
    max_eval_examples: int | None


class SummarizationSettings(Source, Protocol):
    """Documents and reference summaries, with the evaluation's beam search."""

    offline_dir: str | None
    document_column: str
    summary_column: str
    corpus_seed: int
    valid_size: int
    test_size: int
    max_train_examples: int | None
    max_eval_examples: int | None
    max_source_length: int
    max_target_length: int
    generation: Any  # qgplm.tasks.evaluation.GenerationConfig
    rouge_keys: list[str]
