"""The command line as a user types it: exit codes and one-line errors (subprocess, offline)."""

from __future__ import annotations

import time

import pytest

from qgplm.cli.run import quote_int_group_overrides
from tests.conftest import TINY, run_cli


def test_quote_int_group_overrides():
    assert quote_int_group_overrides(["bits=2", "bits.weight=4", "model=gpt2"]) == \
        ["bits='2'", "bits.weight=4", "model=gpt2"]
    assert quote_int_group_overrides(["bits=2,4,8"]) == ["bits='2','4','8'"]
    assert quote_int_group_overrides(["-m", "bits=2,fp", "bits=fp"]) == ["-m", "bits='2',fp", "bits=fp"]


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("override, expected", [
    ("bits.weight=9", "bits.weight must be an integer in 1..8"),
    ("bits.weight=1", "cannot quantize weights to 1 bits: use bits.weight in 2, 3, 4, 5, 6, 7, 8"),
    ("bits.activation=3.5", "bits.activation must be an integer"),
    ("stage=train", "stage='train' is not valid: choose one of teacher, quantize, pipeline"),
    ("method.distill.tau=0", "method.distill.tau must be a positive number"),
    ("+method.distill.tua=0.2", "unknown config key method.distill.tua"),
    ("method.quantizer=nope", "method.quantizer='nope' is not valid"),
    ("stage=quantize", "stage=quantize needs a teacher: pass teacher_path="),
])
def test_bad_override_is_one_clear_line(tmp_path, override, expected):
    err = _one_line_error(run_cli([override, f"hydra.run.dir={tmp_path}"]))
    assert expected in err


def test_unknown_group_option_lists_alternatives(tmp_path):
    err = _one_line_error(run_cli(["model=nope", f"hydra.run.dir={tmp_path}"]))
    assert "model=nope is not an option: choose one of" in err and "tiny_gpt2" in err


def test_hub_name_offline_fails_at_once_naming_alternatives(tmp_path):
    t = time.time()
    err = _one_line_error(run_cli(["model=gpt2", "task=wikitext2", "task.data_dir=../shared/data/wikitext-2",
                                   f"hydra.run.dir={tmp_path}"]))
    assert "hub is unreachable" in err and "model.name_or_path=<local dir" in err
    assert "model=tiny_gpt2" in err
    assert time.time() - t < 60


def test_hub_dataset_offline_names_data_dir(tmp_path):
    err = _one_line_error(run_cli(["task=wikitext2", f"hydra.run.dir={tmp_path}"]))
    assert "task.data_dir=" in err


def test_cli_default_pipeline_fast_dev_run(tmp_path):
    proc = run_cli([*TINY, "bits=2", "trainer.fast_dev_run=true", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "student (W2E2A8)" in proc.stdout
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / ".hydra" / "config.yaml").is_file()


def test_console_shows_each_log_line_once_and_no_tips(tmp_path):
    """A tiny run's console (stdout + stderr): Lightning's messages once each (not also in Lightning's
    own "INFO:" format), no litlogger / litmodels tip, no LeafSpec deprecation warning; run.log still
    gets the messages."""
    # a few real steps (not fast_dev_run): checkpoints are saved, and each stage tests its best one
    proc = run_cli([*TINY, "bits=2", "generate_samples=0", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    lines = console.splitlines()
    assert sum("Seed set to" in line for line in lines) == 1, console[-3000:]
    # one Trainer per stage (teacher, student), each announcing the accelerator once and restoring its best checkpoint
    assert sum("GPU available:" in line for line in lines) == 2, console[-3000:]
    assert sum("Restoring states from the checkpoint path" in line for line in lines) == 2, console[-3000:]
    assert "INFO: " not in console
    assert "Tip:" not in console and "litlogger" not in console
    assert "LeafSpec" not in console
    assert "in eval mode at the start of training" not in console  # the frozen teacher, on purpose
    assert "ModelCheckpoint" not in console  # the test step gets the best checkpoint's path, not "best"
    run_log = (tmp_path / "run.log").read_text()
    assert run_log.count("Seed set to") == 1 and run_log.count("GPU available:") == 2
    assert run_log.count("Restoring states from the checkpoint path") == 2 and "Tip:" not in run_log


@pytest.mark.slow
def test_default_pipeline_learns_and_student_stays_close(tmp_path):
    """A shortened default run (real sizes, 250 steps per stage): the teacher learns the builtin
    corpus well below its unigram PPL (~144) and the W2E2A8 student stays within 25% of it."""
    import json

    proc = run_cli(["teacher.max_steps=250", "student.max_steps=250", "generate_samples=0",
                    f"hydra.run.dir={tmp_path}"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["teacher"]["test_ppl"] < 60
    assert m["ppl_ratio"] < 1.25


def test_existing_run_dir_is_never_overwritten(tmp_path):
    (tmp_path / "metrics.json").write_text('{"earlier": true}')
    err = _one_line_error(run_cli([f"hydra.run.dir={tmp_path}"]))
    assert "already holds a run" in err
    assert (tmp_path / "metrics.json").read_text() == '{"earlier": true}'


def test_multirun_sweep_over_bits_writes_one_run_dir_each(tmp_path):
    proc = run_cli(["-m", *TINY, "bits=2,fp", "trainer.fast_dev_run=true", "generate_samples=0",
                    f"hydra.sweep.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    tags = sorted(json.loads((tmp_path / d / "metrics.json").read_text())["config"]["bits"] for d in ("0", "1"))
    assert tags == ["W2E2A8", "W32E32A32"]


def test_entry_point_works_when_imported_from_another_dir(tmp_path):
    """What the `qgplm-run` console script does: import qgplm.cli.run and call cli(), from any cwd."""
    import subprocess
    import sys

    code = "import sys; from qgplm.cli.run import cli; sys.argv = ['qgplm-run', '--cfg', 'job']; cli()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stage: pipeline" in proc.stdout


def test_quiet_console_drops_handlers_left_on_closed_streams():
    """A handler of an earlier in-process run, on a stream closed since, would print logging's own
    "--- Logging error ---" for each record: quiet_console removes it and keeps the open ones."""
    import io
    import logging

    from qgplm.train.console import quiet_console

    closed, open_ = io.StringIO(), io.StringIO()
    logger = logging.getLogger("qgplm.tests.closed_stream")
    stale, live = logging.StreamHandler(closed), logging.StreamHandler(open_)
    logger.addHandler(stale)
    logger.addHandler(live)
    closed.close()
    try:
        quiet_console()
        assert stale not in logger.handlers and live in logger.handlers
        logger.warning("still printed")
        assert "still printed" in open_.getvalue()
    finally:
        logger.removeHandler(live)
        logger.removeHandler(stale)


@pytest.mark.parametrize("student_eval, shown", [(False, False), (True, True)])
def test_eval_mode_warning_hidden_only_for_the_frozen_teacher(student_eval, shown):
    """Lightning's "Found N module(s) in eval mode" is dropped when the eval-mode modules are the
    teacher's, and still shown when a student module is in eval mode too."""
    import warnings

    import lightning.pytorch as pl
    import torch

    from qgplm.train.console import eval_mode_teacher_expected

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.student, self.teacher = torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2))
            self.teacher.eval()

        def training_step(self, batch, _):
            return self.student(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.student.parameters(), lr=0.1)

    module = Tiny()
    module.student.train(not student_eval)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with eval_mode_teacher_expected(module):
            trainer.fit(module, loader)
    found = [str(w.message) for w in caught if "in eval mode at the start of training" in str(w.message)]
    assert bool(found) == shown, found
