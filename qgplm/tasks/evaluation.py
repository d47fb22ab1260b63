"""Task metrics beyond perplexity, computed in the test loop of any LMModule:

- `SummaryEvaluator`: beam-search summaries through HF `generate` and ROUGE F1 (rouge-score,
  Porter stemmer), like the BART / QuantBART XSum evaluation;
- `RankingEvaluator`: next-utterance prediction (Persona-Chat): every candidate reply is scored
  by the model's mean token log-likelihood given persona + history; accuracy = the gold
  candidate ranked first.

An evaluator is `reset()` at the start of a test loop, `update(model, batch)`-ed per batch and
`compute()`-d at the end; `records()` gives the per-example outputs (summaries) to save.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qgplm.checks import at_least, finite, positive
from qgplm.data.token_stream import IGNORE_INDEX
from qgplm.errors import QgplmError


@dataclass
class GenerationConfig:
    """Beam search of the summarization evaluation (HF `generate`); defaults: BART's XSum recipe."""

    num_beams: int = 6
    max_length: int = 62
    min_length: int = 11
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 3

    def validate(self) -> None:
        positive("task.generation.num_beams", self.num_beams)
        positive("task.generation.max_length", self.max_length)
        if not 0 <= self.min_length <= self.max_length:
            raise QgplmError(f"task.generation.min_length must be in 0..max_length ({self.max_length}), "
                             f"got {self.min_length}")
        at_least("task.generation.no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        finite("task.generation.length_penalty", self.length_penalty)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """One sentence per line, for ROUGE-Lsum (rouge-score splits summaries on newlines).

    A regex splitter on . ! ? rather than nltk's punkt, whose model is a separate download that
    offline machines do not have (torchmetrics' ROUGE-Lsum needs it). Newlines already in the
    text (CNN/DM highlights) are kept as sentence breaks.
    """
    return "\n".join(s.strip() for line in text.splitlines() for s in _SENTENCE_END.split(line) if s.strip())


def rouge_scores(predictions: list[str], references: list[str], keys: list[str]) -> dict[str, float]:
    """Mean ROUGE F1 x 100 per key over the pairs (rouge-score, use_stemmer=True)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise QgplmError("ROUGE needs the rouge-score package: pip install rouge-score (or pip install -e .)") from None
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        s = scorer.score(split_sentences(ref), split_sentences(pred))  # score(target, prediction)
        for k in keys:
            totals[k] += s[k].fmeasure
    n = max(1, len(predictions))
    return {k: 100.0 * v / n for k, v in totals.items()}


class SummaryEvaluator:
    def __init__(self, tokenizer: Any, generation: GenerationConfig, rouge_keys: list[str],
                 examples: list[dict[str, str]]):
        self.tok, self.gen, self.keys, self.examples = tokenizer, generation, list(rouge_keys), examples
        self._out: dict[int, str] = {}

    def reset(self) -> None:
        self._out = {}

    @torch.no_grad()
    def generate(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> list[str]:
        g = self.gen
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=g.num_beams,
                             max_length=g.max_length, min_length=g.min_length, length_penalty=g.length_penalty,
                             no_repeat_ngram_size=g.no_repeat_ngram_size, early_stopping=True, do_sample=False)
        return [t.strip() for t in self.tok.batch_decode(out, skip_special_tokens=True)]

    def update(self, model: nn.Module, batch: dict[str, Tensor]) -> None:
        preds = self.generate(model, batch["input_ids"], batch["attention_mask"])
        for i, p in zip(batch["index"].tolist(), preds, strict=True):
            self._out[i] = p

    def compute(self) -> dict[str, float]:
        idx = sorted(self._out)
        return rouge_scores([self._out[i] for i in idx], [self.examples[i]["summary"] for i in idx], self.keys)

    def records(self) -> list[dict[str, str]]:
        return [{"id": self.examples[i]["id"], "reference": self.examples[i]["summary"], "summary": self._out[i]}
                for i in sorted(self._out)]


def sequence_logprob(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Causal LM: (sum of log p(label token), number of label tokens) per row; labels = -100 elsewhere."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    tgt = labels[:, 1:]
    keep = tgt != IGNORE_INDEX
    tok = logp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1) * keep
    return tok.sum(-1), keep.sum(-1)


class RankingEvaluator:
    """Accuracy of ranking the gold candidate first (`hits@1`) by mean token log-likelihood."""

    def __init__(self) -> None:
        self.correct = self.total = 0

    def reset(self) -> None:
        self.correct = self.total = 0

    @torch.no_grad()
    def update(self, model: nn.Module, batch: dict[str, Tensor]) -> None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total, count = sequence_logprob(logits, batch["labels"])
        score = total / count.clamp_min(1)
        group, gold = batch["group"], batch["gold"]
        for g in group.unique():
            rows = (group == g).nonzero().squeeze(-1)
            best = rows[score[rows].argmax()]
            self.correct += int(gold[best])
            self.total += 1

    def compute(self) -> dict[str, float]:
        return {"accuracy": 100.0 * self.correct / max(1, self.total)}

    def records(self) -> list[dict[str, str]]:
        return []
