"""Shared fixtures: compose the real Hydra config in-process, offline, with tiny sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from qgplm.cli.run import quote_int_group_overrides

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# the offline data beside the repo, or where QGPLM_DATA_DIR says (as conf/paths/default.yaml)
SHARED_DATA = Path(os.environ.get("QGPLM_DATA_DIR") or ROOT.parent / "shared" / "data")

# Tiny everything: a 1-layer width-32 GPT-2, short blocks, few steps.
TINY = [
    "model.config.n_layer=1", "model.config.n_embd=32", "model.config.n_head=2", "model.config.n_positions=64",
    "task.block_size=32", "task.batch_size=4", "task.eval_batch_size=8",
    "task.max_train_tokens=4000", "task.max_eval_tokens=1000",
    "teacher.max_steps=4", "teacher.eval_every=2", "student.max_steps=4", "student.eval_every=2",
    "logger=none", "generate_samples=1",
]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub
os.environ.setdefault("WANDB_MODE", "offline")


def compose_cfg(overrides: list[str], out_dir: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        overrides = quote_int_group_overrides([*TINY, f"paths.output_dir={out_dir}", *overrides])
        return compose(config_name="run", overrides=overrides)


def run_cli(args: list[str], cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "qgplm.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*overrides: str) -> DictConfig:
        return compose_cfg(list(overrides), tmp_path)

    return make


def main_error(main, argv: list[str], capsys) -> str:
    """Run a `key=value` CLI's main in-process as `python -m` does (qgplm.cli.args.run_main) and
    return its one `error:` line, asserting exit code 2 and no traceback (an exception other than
    QgplmError propagates and fails the test)."""
    from qgplm.cli.args import run_main

    old = sys.argv
    sys.argv = ["qgplm", *argv]
    try:
        with pytest.raises(SystemExit) as e:
            run_main(main)
    finally:
        sys.argv = old
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.count("error: ") == 1, err
    return lines[0]
