"""The LM datamodule's protocol: blocks, strided windows scoring each token once, errors."""

from __future__ import annotations

import pytest
import torch

from qgplm.data.sources import load_texts
from qgplm.data.token_stream import IGNORE_INDEX, EvalWindows, LMDataModule, TrainBlocks
from qgplm.errors import QgplmError
from qgplm.tasks.lm import LMTaskConfig
from tests.conftest import SHARED_DATA

PTB_FILES = {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"}
WIKITEXT_FILES = {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}


@pytest.mark.parametrize("n, block, stride", [(100, 16, 16), (100, 16, 5), (17, 16, 16), (64, 16, 1), (50, 10, 7)])
def test_eval_windows_score_every_token_after_the_first_exactly_once(n, block, stride):
    ids = torch.arange(n)
    ds = EvalWindows(ids, block, stride)
    scored = torch.zeros(n, dtype=torch.long)
    for i in range(len(ds)):
        item = ds[i]
        start = ds.starts[i]
        assert torch.equal(item["input_ids"], ids[start : start + block])
        # HF shifts labels by one: position p of a window predicts token start + p, p >= 1
        keep = item["labels"][1:] != IGNORE_INDEX
        scored[start + 1 : start + block][keep] += 1
    assert scored[0] == 0 and torch.all(scored[1:] == 1)


def test_train_blocks_are_contiguous_and_drop_the_tail():
    ds = TrainBlocks(torch.arange(35), 8)
    assert len(ds) == 4
    assert torch.equal(ds[1]["input_ids"], torch.arange(8, 16))
    assert torch.equal(ds[1]["labels"], ds[1]["input_ids"])


class _CharTok:
    """Whitespace 'tokenizer' for data tests: one id per word (hash-free, deterministic)."""

    def __call__(self, lines, add_special_tokens=False):
        return {"input_ids": [[len(w) for w in line.split()] for line in lines]}


def test_split_shorter_than_one_block_is_a_clear_error():
    task = LMTaskConfig(name="t", block_size=8)
    texts = {"train": "a " * 50, "valid": "a b c", "test": "a " * 50}
    with pytest.raises(QgplmError, match="valid split has 3 tokens, fewer than one block"):
        LMDataModule(task, _CharTok(), texts)


def test_token_limits_apply_per_split():
    task = LMTaskConfig(name="t", block_size=4, max_train_tokens=10, max_eval_tokens=6)
    dm = LMDataModule(task, _CharTok(), {s: "ab " * 40 for s in ("train", "valid", "test")})
    assert [dm.ids[s].numel() for s in ("train", "valid", "test")] == [10, 6, 6]


def test_local_wikitext2_files_are_read_with_their_lines():
    task = LMTaskConfig(name="wikitext2", files=WIKITEXT_FILES, data_dir=str(SHARED_DATA / "wikitext-2"))
    texts = load_texts(task)
    assert set(texts) == {"train", "valid", "test"}
    assert texts["test"].startswith(" \n = Robert <unk> = \n")
    # the data README counts 2,088,628 train words: the words plus one end-of-line per line
    assert len(texts["train"].split()) + texts["train"].count("\n") == 2088628


def test_missing_data_dir_and_missing_file(tmp_path):
    with pytest.raises(QgplmError, match="is not a directory"):
        load_texts(LMTaskConfig(name="ptb", files=PTB_FILES, data_dir=str(tmp_path / "nope")))
    (tmp_path / "ptb.train.txt").write_text("a b c\n")
    with pytest.raises(QgplmError, match="missing valid file .*task.files.valid="):
        load_texts(LMTaskConfig(name="ptb", files=PTB_FILES, data_dir=str(tmp_path)))


def test_non_utf8_file_is_a_clear_error(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / f"ptb.{split}.txt").write_bytes(b"ok\n\xff\xfe bad\n")
    with pytest.raises(QgplmError, match="not UTF-8"):
        load_texts(LMTaskConfig(name="ptb", files=PTB_FILES, data_dir=str(tmp_path)))


@pytest.mark.parametrize("stride, ok", [(None, True), (1, True), (15, True), (16, False), (0, False)])
def test_eval_stride_must_leave_one_shared_token(stride, ok):
    """An explicit stride of block_size would be clamped to block_size - 1 without a word: refused."""
    task = LMTaskConfig(name="builtin", block_size=16, eval_stride=stride)
    if ok:
        task.validate()
    else:
        with pytest.raises(QgplmError, match=r"task.eval_stride must be in 1..block_size - 1 \(15\)"):
            task.validate()


def test_saved_config_naming_a_task_source_reads_as_its_task_class(tmp_path):
    """A run dir's config written when `task.source` chose the task (no `_target_`) still builds,
    with the file names and hub column the name implied (so `qgplm.export` can rebuild its student)."""
    from omegaconf import OmegaConf

    from qgplm.train.config import RunConfig
    from tests.conftest import compose_cfg

    cfg = OmegaConf.to_container(compose_cfg(["task=ptb"], tmp_path), resolve=True)
    cfg["task"] = {k: v for k, v in cfg["task"].items() if k not in ("_target_", "files", "text_column")}
    cfg["task"].update(source="ptb", files={"test": "my.test.txt"})
    run = RunConfig.from_hydra(OmegaConf.create(cfg))
    assert isinstance(run.task, LMTaskConfig) and run.task.text_column == "sentence"
    assert run.task.files == {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "my.test.txt"}
