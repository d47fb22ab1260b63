"""hparams_search=optuna: an Optuna study over tau / lambda / learning rates through Hydra."""

from __future__ import annotations

import json

import yaml

from tests.conftest import TINY, run_cli


def test_optuna_search_minimises_the_returned_validation_ppl(tmp_path):
    teacher, sweep = tmp_path / "teacher", tmp_path / "sweep"
    proc = run_cli([*TINY, "stage=teacher", f"hydra.run.dir={teacher}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(["-m", "hparams_search=optuna", *TINY, "stage=quantize", f"teacher_path={teacher}",
                    "generate_samples=0", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=1",
                    f"hydra.sweep.dir={sweep}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"method.distill.tau", "method.distill.contrastive_weight",
                                          "student.optim.lr", "student.optim.scale_lr"}
    trials = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    best_val = min(t["student"]["best_val_ppl"] for t in trials)
    assert abs(result["best_value"] - best_val) < 1e-6 * best_val  # what run returns: validation, not test PPL


def test_a_failed_job_is_reported_and_the_sweep_goes_on(tmp_path):
    """TWN cannot take 4 bits: job #0 fails at validation, job #1 still runs; the failure is told
    at once and at the end (one line each), kept in the job's error.txt, and the sweep exits 2."""
    tiny = [o for o in TINY if not o.startswith("generate_samples")]
    proc = run_cli(["-m", "method=twn,minmax", "bits=4", *tiny, "generate_samples=0",
                    f"hydra.sweep.dir={tmp_path}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 2 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: job #0 (method=twn bits='4'") and "cannot quantize weights to 4 bits" in lines[0]
    assert lines[1].startswith("error: 1 job(s) of the sweep failed: #0")
    assert "cannot quantize weights to 4 bits" in (tmp_path / "0" / "error.txt").read_text()
    assert json.loads((tmp_path / "1" / "metrics.json").read_text())["config"]["method"] == "minmax"
