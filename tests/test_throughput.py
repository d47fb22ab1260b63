"""ThroughputCallback: tokens/s of the training steps, in each stage's metrics.json. Token counts and
the warm-up rule against hand-computed values, what is timed (training batches, not validation) on a
tiny Lightning fit, and the figures' place in metrics.json after fast_dev_run-sized pipeline runs."""

from __future__ import annotations

import json
import time

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from qgplm.train.callbacks import ThroughputCallback
from qgplm.train.callbacks.throughput import batch_tokens


def test_batch_tokens_counts_the_attention_mask():
    ids = torch.zeros(2, 5, dtype=torch.long)
    assert batch_tokens({"input_ids": ids, "attention_mask": torch.ones_like(ids)}) == 10
    padded = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert batch_tokens({"input_ids": ids, "attention_mask": padded}) == 8
    assert batch_tokens({"input_ids": ids}) == 10
    with pytest.raises(ValueError, match="cannot count its tokens"):
        batch_tokens({"labels": ids})


def test_figures_skip_the_warm_up_only_in_long_enough_runs():
    cb = ThroughputCallback(skip=3)
    assert cb.figures() is None  # no training batch: no figure
    cb.steps = [(9.0, 100)] * 3 + [(0.5, 100), (1.5, 100), (1.0, 100), (1.0, 100)]  # 7 > 2 x 3: skip 3
    cb.world_size = 2
    f = cb.figures()
    assert f["batches_skipped"] == 3 and f["batches_timed"] == 4 and f["seconds"] == pytest.approx(4.0)
    assert f["tokens"] == 800 and f["tokens_per_s"] == pytest.approx(200.0) and f["batch_s"] == pytest.approx(1.0)
    cb.steps, cb.world_size = [(2.0, 64)] * 6, 1  # 6 = 2 x 3: too short to skip, every batch counts
    f = cb.figures()
    assert f["batches_skipped"] == 0 and f["batches_timed"] == 6 and f["tokens_per_s"] == pytest.approx(32.0)


class _Tiny(pl.LightningModule):
    """A linear model on dict batches like qgplm's; its validation is slow on purpose."""

    def __init__(self, val_sleep: float):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 4)
        self.val_sleep = val_sleep

    def training_step(self, batch, batch_idx):
        return self.emb(batch["input_ids"]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        time.sleep(self.val_sleep)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int, block: int = 8, batch: int = 2) -> DataLoader:
    ids = torch.randint(0, 16, (n, block))
    rows = [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]
    return DataLoader(rows, batch_size=batch)


def _fit(cb: ThroughputCallback, **trainer_kw) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb], **trainer_kw)
    trainer.fit(_Tiny(val_sleep=0.25), _loader(40), _loader(2, batch=2))
    return trainer


def test_a_fit_times_its_training_batches_and_not_validation():
    cb = ThroughputCallback(skip=2)
    _fit(cb, max_steps=10, val_check_interval=5, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    f = cb.figures()
    assert len(cb.steps) == 10 and f["batches_skipped"] == 2 and f["batches_timed"] == 8
    assert f["tokens"] == 8 * 2 * 8 and f["world_size"] == 1
    assert f["seconds"] < 0.25  # two validations of 0.25 s ran between the batches: none of it counted
    assert f["tokens_per_s"] == pytest.approx(f["tokens"] / f["seconds"])


def test_fast_dev_run_times_its_one_batch():
    cb = ThroughputCallback()
    _fit(cb, fast_dev_run=True)
    f = cb.figures()
    assert f["batches_timed"] == 1 and f["batches_skipped"] == 0 and f["tokens"] == 16 and f["tokens_per_s"] > 0


def test_metrics_json_has_each_stages_train_throughput(tiny_cfg, tmp_path):
    """A fast_dev_run pipeline (1 teacher batch, 1 student batch of 4 x 32 tokens), then a run whose teacher
    trains no step (its figure is None) and whose student runs 8 steps (the first 3 skipped)."""
    from qgplm.train.config import RunConfig
    from qgplm.train.pipeline import run_stages
    from qgplm.train.summary import print_summary

    cfg = tiny_cfg("trainer.fast_dev_run=true")
    run_stages(RunConfig.from_hydra(cfg), cfg.trainer, cfg.get("logger"), cfg.get("callbacks"))
    m = json.loads((tmp_path / "metrics.json").read_text())
    for stage in ("teacher", "student"):
        f = m[stage]["train_throughput"]
        assert f["batches_timed"] == 1 and f["tokens"] == 4 * 32 and f["tokens_per_s"] > 0, (stage, f)
    assert json.loads((tmp_path / "teacher_metrics.json").read_text())["train_throughput"]["tokens"] == 128

    out = tmp_path / "second"
    cfg = tiny_cfg("teacher.max_steps=0", "student.max_steps=8", "student.eval_every=8", f"paths.output_dir={out}")
    run_stages(RunConfig.from_hydra(cfg), cfg.trainer, cfg.get("logger"), cfg.get("callbacks"))
    m = json.loads((out / "metrics.json").read_text())
    assert m["teacher"]["train_throughput"] is None
    s = m["student"]["train_throughput"]
    assert s["batches_skipped"] == 3 and s["batches_timed"] == 5 and s["tokens"] == 5 * 4 * 32
    from rich.console import Console

    console = Console(record=True, width=200)
    print_summary(m, str(out), console)
    assert "train tok/s" in console.export_text()
