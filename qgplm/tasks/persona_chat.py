"""Next-utterance prediction (Persona-Chat) with causal LMs: accuracy of ranking the gold reply first.

Reading the ConvAI2 JSON and laying out sequences is qgplm.data.personachat's, the ranking metric
qgplm.tasks.evaluation's. Here: the task's config and its tokenizer corpus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qgplm.checks import at_least, count_or_none, positive
from qgplm.data.personachat import PersonaChatDataModule
from qgplm.errors import QgplmError
from qgplm.tasks.base import BlockSized, Task, TaskConfig

Dialogs = dict[str, list[dict[str, Any]]]


@dataclass
class PersonaChatTaskConfig(BlockSized, TaskConfig):
    """Dialogs of the ConvAI2 JSON in `data_dir` (`files.json` for another file name)."""

    _target_: str = "qgplm.tasks.persona_chat.NextUtterance"
    valid_size: int | None = None  # train dialogs held out for validation
    max_train_examples: int | None = None  # caps on utterances per split
    max_eval_examples: int | None = None
    block_size: int = 256  # tokens per sequence: persona + history + reply, context cut from the left
    max_history: int = 2  # previous turns kept = 2 * max_history + 1
    num_candidates: int | None = None  # candidates scored per turn (the last ones; null: all)

    def validate(self) -> None:
        super().validate()
        positive("task.block_size", self.block_size)
        for key in ("valid_size", "max_train_examples", "max_eval_examples", "num_candidates"):
            count_or_none(f"task.{key}", getattr(self, key))
        at_least("task.max_history", self.max_history, 0)
        if self.num_candidates == 1:
            raise QgplmError("task.num_candidates=1 leaves nothing to rank: use >= 2 or null (all)")


class NextUtterance(Task):
    """Test accuracy of the gold candidate ranked first by mean token log-likelihood."""

    Config = PersonaChatTaskConfig
    kind = "next_utterance"
    cfg: PersonaChatTaskConfig

    def load(self) -> Dialogs:
        from qgplm.data.personachat import load_dialogs

        return load_dialogs(self.cfg)

    def tokenizer_corpus(self, data: Dialogs) -> list[str]:
        """Persona sentences, history turns and gold replies of the train dialogs, one per line."""
        return [t + "\n" for d in data["train"] for t in
                (*d["personality"], *(x for u in d["utterances"] for x in (*u["history"], u["candidates"][-1])))]

    def datamodule(self, tokenizer: Any, data: Dialogs, seed: int) -> PersonaChatDataModule:
        return PersonaChatDataModule(self.cfg, tokenizer, data, seed=seed)

    def evaluator(self, tokenizer: Any, dm: PersonaChatDataModule) -> Any:
        from qgplm.tasks.evaluation import RankingEvaluator

        return RankingEvaluator()
