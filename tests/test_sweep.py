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
