"""A task kind added from outside the package (tests/plugins: one module, one YAML) runs end to end
through the normal entry, selected with task=toy once its folder is on Hydra's search path."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from qgplm.cli.run import quote_int_group_overrides
from qgplm.errors import QgplmError
from qgplm.train.config import RunConfig
from qgplm.train.pipeline import run_stages
from tests.conftest import CONF, ROOT, run_cli

PLUGIN_CONF = ROOT / "tests" / "plugins" / "conf"
SEARCH = f"hydra.searchpath=[file://{PLUGIN_CONF}]"
TINY_TOY = [SEARCH, "task=toy", "model.config.n_layer=1", "model.config.n_embd=32", "model.config.n_head=2",
            "model.config.n_positions=32", "teacher.max_steps=4", "teacher.eval_every=2", "student.max_steps=4",
            "student.eval_every=2", "logger=none", "generate_samples=1"]


def _compose(overrides: list[str], out):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="run", overrides=quote_int_group_overrides([f"paths.output_dir={out}", *overrides]))


def test_toy_task_runs_both_stages_and_reports_its_own_metric(tmp_path):
    cfg = _compose(TINY_TOY, tmp_path)
    run = RunConfig.from_hydra(cfg)
    assert type(run.task).__name__ == "CountingConfig" and run.task.kind == "counting"
    metrics = run_stages(run, cfg.trainer, cfg.get("logger"), cfg.get("callbacks"))
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for who in ("teacher", "student"):
        assert 0.0 <= on_disk[who]["next_token_accuracy"] <= 100.0 and on_disk[who]["test_ppl"] > 1
    assert on_disk["protocol"]["metric"].startswith("next-token accuracy")
    assert on_disk["protocol"]["blocks"]["train"] > 0
    assert on_disk["counting"] == {"sentences_per_split": 200}  # the task's own report entry
    assert "samples" not in on_disk  # the toy generates none (language modelling would)
    assert (tmp_path / "teacher" / "tokenizer.json").is_file()  # its BPE, saved with the teacher
    assert on_disk["size"]["compression"] > 1


def test_toy_task_values_are_validated_at_start_up(tmp_path):
    with pytest.raises(QgplmError, match="task.sentences must be a positive number"):
        RunConfig.from_hydra(_compose([*TINY_TOY, "task.sentences=0"], tmp_path))
    with pytest.raises(QgplmError, match="unknown config key task.max_train_tokens"):
        RunConfig.from_hydra(_compose([*TINY_TOY, "+task.max_train_tokens=10"], tmp_path))
    with pytest.raises(QgplmError, match="task=toy needs a causal model"):
        RunConfig.from_hydra(_compose([SEARCH, "task=toy", "model=tiny_bart"], tmp_path))
    with pytest.raises(QgplmError, match=r"task.block_size=64 exceeds the model's 32 positions"):
        from qgplm.tasks import build_task
        from qgplm.train.pipeline import check_model_fits

        run = RunConfig.from_hydra(_compose([*TINY_TOY, "task.block_size=64"], tmp_path))
        check_model_fits(run, build_task(run.task), type("C", (), {"n_positions": 32})())


def test_task_target_that_is_not_a_task_is_one_line_error(tmp_path):
    with pytest.raises(QgplmError, match=r"task._target_=tests.plugins.nope.Counting cannot be imported"):
        RunConfig.from_hydra(_compose([*TINY_TOY, "task._target_=tests.plugins.nope.Counting"], tmp_path))
    with pytest.raises(QgplmError, match=r"task._target_=qgplm.train.config.RunConfig is not a qgplm.tasks.Task"):
        RunConfig.from_hydra(_compose([*TINY_TOY, "task._target_=qgplm.train.config.RunConfig"], tmp_path))


def test_toy_task_through_the_command_line(tmp_path):
    proc = run_cli([*TINY_TOY, "trainer.fast_dev_run=true", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["task"] == "toy"
