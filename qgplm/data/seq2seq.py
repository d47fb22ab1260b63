"""Summarization data (XSum, CNN/DailyMail): documents and reference summaries, per split.

Sources, in this order:
- `task.data_dir=<folder>`: local files (below);
- `task.data_dir=null` and the hub reachable: the HF data set `task.hub_path` / `task.hub_name`;
- `task.data_dir=null`, no hub: `task.offline_dir` (the samples in ../shared/data), with a log line.

Local formats:
- JSON lines `{"id", "document", "summary"}` (XSum's release, as in xsum-sample/). With
  `task.files.{train,valid,test}` each split is its own file; otherwise every `*.jsonl` of the
  folder is read and split deterministically (below).
- CNN/DailyMail `.story` files (article paragraphs, then `@highlight` + one highlight each), in
  any sub-folder (cnn_stories/, dm_stories/). With url_lists/all_{train,val,test}.txt present the
  official split is used (story file name = sha1 of the URL); otherwise the deterministic split.
  The reference summary is the highlights, one per line (so ROUGE-Lsum sees the sentences).

Deterministic split of a sample without splits: examples sorted by id, shuffled with
`random.Random(task.corpus_seed)`; the first `task.test_size` are test, the next
`task.valid_size` valid, the rest train.

Tokenization: document truncated to `task.max_source_length` tokens, summary to
`task.max_target_length`; labels are the summary ids with padding = -100. The model builds its
own decoder inputs from the labels (`prepare_decoder_input_ids_from_labels`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import torch

from qgplm.data.examples import ExampleDataModule
from qgplm.data.settings import SummarizationSettings
from qgplm.data.token_stream import IGNORE_INDEX
from qgplm.errors import QgplmError, optional_module
from qgplm.hub import hub_reachable

log = logging.getLogger("qgplm")
SPLITS = ("train", "valid", "test")
Example = dict[str, str]  # id, document, summary
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
URL_LISTS = {"train": "all_train.txt", "valid": "all_val.txt", "test": "all_test.txt"}


# ------------------------------------------------------------------------------ reading
def load_examples(task: SummarizationSettings) -> tuple[dict[str, list[Example]], str]:
    """The three splits of a summarization task, and a one-line description of where they came from."""
    if task.data_dir is not None:
        splits, how = read_local(task, Path(task.data_dir).expanduser(), "task.data_dir")
    elif task.hub_path and hub_reachable():
        splits, how = _read_hub(task), f"hub {task.hub_path}/{task.hub_name}"
    elif task.offline_dir is not None:
        log.info("the Hugging Face hub is unreachable: task %s reads its local sample %s", task.name, task.offline_dir)
        splits, how = read_local(task, Path(task.offline_dir).expanduser(), "task.offline_dir")
    else:
        raise QgplmError(f"task {task.name}: the hub is unreachable and no local copy is configured: "
                         f"pass task.data_dir=<folder with its files>")
    for split in SPLITS:
        limit = task.max_train_examples if split == "train" else task.max_eval_examples
        if limit is not None:
            splits[split] = splits[split][:limit]
        if not splits[split]:
            raise QgplmError(f"task {task.name}: the {split} split is empty: give more data or set "
                             f"task.valid_size / task.test_size")
    return splits, how


def read_local(task: SummarizationSettings, root: Path, key: str) -> tuple[dict[str, list[Example]], str]:
    if not root.is_dir():
        raise QgplmError(f"{key}={root} is not a directory: point it at the folder holding the {task.name} files")
    if all(s in task.files for s in SPLITS):
        return {s: read_jsonl(_existing(root / task.files[s], f"task.files.{s}")) for s in SPLITS}, \
            f"local files {root} ({', '.join(task.files[s] for s in SPLITS)})"
    stories = sorted(root.rglob("*.story"))
    jsonl = sorted(root.glob("*.jsonl"))
    if stories:
        official = _official_cnndm_split(root, stories)
        if official is not None:
            return official, f"local .story files {root}, official url_lists split"
        examples = [read_story(p) for p in stories]
    elif jsonl:
        examples = [ex for p in jsonl for ex in read_jsonl(p)]
    else:
        raise QgplmError(f"{root} holds no *.jsonl (id, document, summary) and no CNN/DM *.story files: "
                         f"fix {key} or set task.files.{{train,valid,test}}=<file names>")
    return split_examples(examples, task), (f"local sample {root}: {len(examples)} examples split "
                                            f"{task.test_size} test / {task.valid_size} valid / rest train "
                                            f"(seed {task.corpus_seed})")


def _existing(path: Path, key: str) -> Path:
    if not path.is_file():
        raise QgplmError(f"missing file {path}: fix {key} or task.data_dir")
    return path


def read_jsonl(path: Path) -> list[Example]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise QgplmError(f"{path}:{n} is not valid JSON ({e.msg}): one object per line is expected") from None
            if not isinstance(row, dict) or not {"document", "summary"} <= row.keys():
                raise QgplmError(f"{path}:{n} needs the keys document and summary (got "
                                 f"{sorted(row) if isinstance(row, dict) else type(row).__name__})")
            out.append({"id": str(row.get("id", f"{path.stem}-{n}")), "document": row["document"],
                        "summary": row["summary"]})
    return out


def read_story(path: Path) -> Example:
    """A CNN/DM .story file: article paragraphs, then `@highlight` blocks (one highlight each)."""
    article, highlights, next_is_highlight = [], [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("@highlight"):
            next_is_highlight = True
        elif next_is_highlight:
            highlights.append(line if line[-1] in ".!?\"'" else line + ".")
            next_is_highlight = False
        else:
            article.append(line)
    if not highlights:
        raise QgplmError(f"{path} has no @highlight lines: is it a CNN/DailyMail .story file?")
    return {"id": path.stem, "document": " ".join(article), "summary": "\n".join(highlights)}


def _official_cnndm_split(root: Path, stories: list[Path]) -> dict[str, list[Example]] | None:
    lists = root / "url_lists"
    if not all((lists / f).is_file() for f in URL_LISTS.values()):
        return None
    by_hash = {p.stem: p for p in stories}
    out = {}
    for split, fname in URL_LISTS.items():
        hashes = [hashlib.sha1(u.strip().encode()).hexdigest() for u in (lists / fname).read_text().splitlines()
                  if u.strip()]
        out[split] = [read_story(by_hash[h]) for h in hashes if h in by_hash]
    return out


def split_examples(examples: list[Example], task: SummarizationSettings) -> dict[str, list[Example]]:
    n_test, n_valid = task.test_size or 0, task.valid_size or 0
    if not n_test or not n_valid:
        raise QgplmError(f"a local {task.name} sample without splits needs task.valid_size and task.test_size "
                         f"(examples held out; the rest trains)")
    if n_test + n_valid >= len(examples):
        raise QgplmError(f"task.valid_size + task.test_size = {n_valid + n_test} leaves no training data out of "
                         f"{len(examples)} examples: lower them")
    order = sorted(examples, key=lambda e: e["id"])
    random.Random(task.corpus_seed).shuffle(order)
    return {"test": order[:n_test], "valid": order[n_test : n_test + n_valid], "train": order[n_test + n_valid :]}


def _read_hub(task: SummarizationSettings) -> dict[str, list[Example]]:
    datasets = optional_module("datasets", "a hub data set", "pass task.data_dir=<local folder>")
    doc_col, sum_col = task.document_column, task.summary_column
    ds = datasets.load_dataset(task.hub_path, task.hub_name)
    return {split: [{"id": str(r.get("id", i)), "document": r[doc_col], "summary": r[sum_col]}
                    for i, r in enumerate(ds[HUB_SPLITS[split]])] for split in SPLITS}


# ------------------------------------------------------------------------------ batches
class Seq2SeqCollator:
    """Tokenize a list of examples into padded encoder inputs and -100-padded labels."""

    def __init__(self, tokenizer: Any, max_source: int, max_target: int):
        self.tok, self.max_source, self.max_target = tokenizer, max_source, max_target

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        enc = self.tok([r["document"] for r in rows], max_length=self.max_source, truncation=True,
                       padding=True, return_tensors="pt")
        tgt = self.tok(text_target=[r["summary"] for r in rows], max_length=self.max_target, truncation=True,
                       padding=True, return_tensors="pt")
        labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, IGNORE_INDEX)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels,
                "index": torch.tensor([r["index"] for r in rows], dtype=torch.long)}


class Seq2SeqDataModule(ExampleDataModule):
    """Summarization batches: train shuffled; valid/test in order, each row carrying its `index`
    into `self.examples[split]` (to attach generated summaries to their references)."""

    def __init__(self, task: SummarizationSettings, tokenizer: Any, examples: dict[str, list[Example]],
                 source: str = "", seed: int = 0):
        super().__init__()
        self.task, self.tokenizer, self.seed, self.source = task, tokenizer, seed, source
        self.examples = examples
        self.collate = Seq2SeqCollator(tokenizer, task.max_source_length, task.max_target_length)

    def rows(self, split: str) -> list[dict[str, Any]]:
        return [{**ex, "index": i} for i, ex in enumerate(self.examples[split])]

    def collate_train(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.collate(rows)

    def protocol(self) -> dict[str, Any]:
        g = self.task.generation
        return {
            "metric": f"ROUGE F1 ({', '.join(self.task.rouge_keys)}; rouge-score, Porter stemmer, x100) of beam-search "
                      f"summaries vs the references on the test split; PPL of the reference summary tokens "
                      f"(teacher forcing) for validation / model selection",
            "data": self.source,
            "examples": {k: len(v) for k, v in self.examples.items()},
            "max_source_length": self.task.max_source_length,
            "max_target_length": self.task.max_target_length,
            "generation": {"num_beams": g.num_beams, "max_length": g.max_length, "min_length": g.min_length,
                           "length_penalty": g.length_penalty, "no_repeat_ngram_size": g.no_repeat_ngram_size},
        }
