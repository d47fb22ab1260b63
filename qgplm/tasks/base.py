"""What a task kind is to the pipeline: one `Task` class with a small protocol and its own config.

A task YAML (conf/task/*.yaml) names its class with `_target_`, as lightning-hydra-template's
model and datamodule configs do; the rest of the YAML is that class's `Config` dataclass, built
and validated once at start-up by qgplm.train.config. The pipeline then only calls the protocol below,
so a new task kind is one module with a `Task` subclass plus one YAML (tests/plugins/toy_task.py
is such a kind, kept outside the package).

The protocol, in the order a run uses it:
    load()                          the raw splits (text, examples, dialogs, ...)
    tokenizer_corpus(data)          the training text a task-trained tokenizer learns from
    own_tokenizer(data)             that tokenizer, or None for the model's
    datamodule(tokenizer, data, seed)   the Lightning datamodule (`TaskDataModule`)
    evaluator(tokenizer, dm)        the test-time metric beyond perplexity, or None
    model_kind, max_positions       what model the task needs (checked before anything trains)
    samples(...), report(...)       what the task adds to metrics.json and the W&B samples table
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from qgplm.checks import at_least, count_or_none, positive
from qgplm.errors import QgplmError


@dataclass
class TaskConfig:
    """The fields every task kind has. `_target_` is the task class (module.Class) this config is for."""

    name: str
    _target_: str = ""
    data_dir: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # split -> file name inside data_dir
    batch_size: int = 16
    eval_batch_size: int = 32
    num_workers: int = 0
    corpus_seed: int = 0  # generated corpora and deterministic splits
    bpe_vocab_size: int | None = None  # train a byte-level BPE of this size on the train split

    @property
    def kind(self) -> str:
        """The task's kind (lm, summarization, next_utterance, ...): its class says."""
        return task_class(self._target_).kind

    def validate(self) -> None:
        for key in ("batch_size", "eval_batch_size"):
            positive(f"task.{key}", getattr(self, key))
        count_or_none("task.bpe_vocab_size", self.bpe_vocab_size)
        at_least("task.num_workers", self.num_workers, 0)
        at_least("task.corpus_seed", self.corpus_seed, 0)

    def sequence_lengths(self) -> list[tuple[str, int]]:
        """(key, tokens) of every length setting that must fit the model's positions, longest first
        where it matters: the first is what an out-of-memory message suggests lowering."""
        return []


class BlockSized:
    """Mixin of the task configs whose sequences are blocks of `block_size` tokens (language
    modelling, next utterance): that one length must fit the model's positions."""

    block_size: int

    def sequence_lengths(self) -> list[tuple[str, int]]:
        return [("task.block_size", self.block_size)]


class TaskDataModule(Protocol):
    """What the pipeline needs of a task's datamodule besides Lightning's loaders."""

    def protocol(self) -> dict[str, Any]:
        """The evaluation protocol (metric, splits, sizes), written into metrics.json."""


class Evaluator(Protocol):
    """A test-time metric beyond perplexity, driven by the test loop of qgplm.train.module.LMModule."""

    def reset(self) -> None: ...

    def update(self, model: Any, batch: dict[str, Any]) -> None: ...

    def compute(self) -> dict[str, float]: ...

    def records(self) -> list[dict[str, str]]:
        """Per-example outputs to save beside metrics.json (e.g. generated summaries); [] for none."""


class Task:
    """One task kind. Subclasses set `Config`, `kind` (and `model_kind` unless causal) and implement `load` and
    `datamodule`; the other methods have the defaults most kinds want."""

    Config: ClassVar[type[TaskConfig]] = TaskConfig
    kind: ClassVar[str] = ""
    model_kind: ClassVar[str] = "causal"  # causal | seq2seq (conf/model/*.yaml model.kind)

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    def load(self) -> Any:
        raise NotImplementedError

    def tokenizer_corpus(self, data: Any) -> str | list[str]:
        """The training text a tokenizer trained for this task learns from."""
        raise NotImplementedError

    def own_tokenizer(self, data: Any) -> Any | None:
        """A tokenizer trained on this task's data (task.bpe_vocab_size), else None: the model's."""
        if not self.cfg.bpe_vocab_size:
            return None
        from qgplm.data.bpe import train_bpe_tokenizer

        return train_bpe_tokenizer(self.tokenizer_corpus(data), self.cfg.bpe_vocab_size,
                                   seq2seq=self.model_kind == "seq2seq")

    def datamodule(self, tokenizer: Any, data: Any, seed: int) -> TaskDataModule:
        raise NotImplementedError

    def evaluator(self, tokenizer: Any, dm: Any) -> Evaluator | None:
        return None

    @property
    def max_positions(self) -> int:
        """Positions a model built for this task gets (and a loaded one must have)."""
        return max(n for _, n in self.cfg.sequence_lengths())

    def check_positions(self, positions: int, generate_samples: int) -> None:
        """Every length setting against the model's `positions`, before anything trains."""
        for key, n in self.cfg.sequence_lengths():
            if n > positions:
                raise QgplmError(f"{key}={n} exceeds the model's {positions} positions: set {key}<={positions}")

    def samples(self, models: dict[str, Any], tokenizer: Any, dm: Any, n: int) -> dict[str, list[dict[str, str]]]:
        """Up to `n` generated outputs per model ("teacher", "student") beyond the evaluator's
        records, after the student stage; {} where the task generates none."""
        return {}

    def report(self, samples: dict[str, list[dict[str, str]]], records: dict[str, list[dict[str, str]]],
               n: int) -> dict[str, Any]:
        """What this task adds to metrics.json, from `samples` and the evaluators' `records`
        per model (`n`: generate_samples)."""
        return {"samples": samples} if samples else {}


def task_class(target: str | None) -> type[Task]:
    """The Task subclass `task._target_` names (module.Class), with a one-line error otherwise."""
    from hydra.utils import get_class

    if not target:
        raise QgplmError("task._target_ is missing: choose a task with task=<name> (conf/task/*.yaml), or set "
                         "task._target_=<module.Class> of a qgplm.tasks.Task subclass")
    try:
        cls = get_class(target)
    except Exception as e:  # noqa: BLE001 - Hydra wraps import and attribute errors alike
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QgplmError(f"task._target_={target} cannot be imported ({reason}): name a qgplm.tasks.Task "
                         f"subclass as module.Class, e.g. qgplm.tasks.lm.LanguageModelling") from None
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise QgplmError(f"task._target_={target} is not a qgplm.tasks.Task subclass: name one, "
                         f"e.g. qgplm.tasks.lm.LanguageModelling")
    return cls


def build_task(cfg: TaskConfig) -> Task:
    """The task object of a validated task config."""
    return task_class(cfg._target_)(cfg)

