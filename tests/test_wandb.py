"""logger=wandb: offline automatically without a key, and every promised key is in the run files."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT, TINY
from tests.wandb_files import read_run


def test_wandb_offline_run_has_the_promised_keys(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HF_HUB_OFFLINE="1", HOME=str(tmp_path))  # no API key (no ~/.netrc), WANDB_MODE unset
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "qgplm.run", *TINY, "logger=wandb", "generate_samples=2",
                           "trainer.log_every_n_steps=1", f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    runs = {r["run"].job_type: r for r in map(read_run, files)}
    assert {"teacher", "student"} <= set(runs)
    student = runs["student"]
    assert student["run"].run_group == "builtin-tiny_gpt2"
    assert student["run"].display_name == "run-student"
    keys = set().union(*student["history"])
    for key in ("train/loss", "train/kd", "train/contrastive", "val/ppl", "val/teacher_ppl",
                "val/homogeneity_student", "val/homogeneity_teacher", "scales/alpha/_type", "scales/gamma/_type",
                "scales/transformer.h.0.attn.c_attn/gamma", "size/compression", "test/ppl_final", "samples/_type"):
        assert key in keys, (key, sorted(keys))
    assert student["config"]["method"]["name"] == "quantgpt"
    assert student["config"]["bits"]["weight"] == 2
    compression = next(row["size/compression"] for row in student["history"] if "size/compression" in row)
    assert compression > 1
    assert 0 < next(r["val/homogeneity_student"] for r in student["history"] if "val/homogeneity_student" in r) <= 1
