"""The CPU-runnable parts of experiments/gpu_check.sh: the cost benchmark at tiny sizes (bf16-mixed
on CPU, in-process), the script's syntax and its clear refusals, and its QAT run's overrides."""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SHARED_DATA

SCRIPT = ROOT / "experiments" / "gpu_check.sh"


def _args(**kw) -> argparse.Namespace:
    base = dict(layers=1, width=64, vocab=128, block=16, batch=2, steps=2, warmup=1, device="cpu",
                precision="bf16-mixed", size=None, json=False, one=None)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("setting", ["fp", "kd_only", "quantgpt"])
def test_bench_cost_measures_tiny_bf16_on_cpu(setting):
    sys.path.insert(0, str(ROOT / "experiments"))
    from bench_cost import SIZES, measure

    row = measure(setting, _args())
    assert row["precision"] == "bf16-mixed" and row["device"] == "cpu"
    assert row["step_s"] > 0 and row["peak_mib"] > 0 and math.isfinite(row["loss"])
    assert row["tokens_per_s"] == pytest.approx(2 * 16 / row["step_s"])
    assert SIZES["gpt2-small"] == (12, 768, 50257)


def test_bench_cost_refuses_cuda_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    sys.path.insert(0, str(ROOT / "experiments"))
    from bench_cost import measure

    with pytest.raises(SystemExit, match="cuda"):
        measure("fp", _args(device="cuda"))


def test_gpu_check_script_is_valid_bash_and_fails_clearly(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    text = SCRIPT.read_text()
    assert "set -euo pipefail" in text and "curl" not in text and "wget" not in text
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and all("--no-index" in line and "--no-deps" in line for line in installs)  # offline only
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "nope")], capture_output=True, text=True)
    assert proc.returncode == 2 and "gpu_check: error: no WikiText-2 under" in proc.stderr
    import torch

    if not torch.cuda.is_available():
        proc = subprocess.run(["bash", str(SCRIPT), str(SHARED_DATA), str(tmp_path / "out")], capture_output=True,
                              text=True, env={**os.environ})
        assert proc.returncode == 2 and "torch.cuda.is_available() is False" in proc.stderr
        assert not (tmp_path / "out").exists()  # refused before writing anything


def _bash_array(name: str) -> list[str]:
    """The first (the GPU's) value of a bash array of the script, e.g. QAT_SIZE=(a=1 b=2)."""
    m = re.search(rf"^{name}=\((.*?)\)", SCRIPT.read_text(), flags=re.M | re.S)
    assert m, name
    return m.group(1).split()


def test_gpu_check_qat_run_overrides_validate(tmp_path):
    """The overrides of the script's QAT run compose and validate (GPT-2 small's shape)."""
    from hydra import compose, initialize_config_dir

    from qgplm.config import RunConfig
    from qgplm.run import quote_int_group_overrides

    overrides = [*_bash_array("QAT_TRAINER"), "task=wikitext2", f"task.data_dir={SHARED_DATA / 'wikitext-2'}",
                 f"model.tokenizer={SHARED_DATA / 'gpt2-tokenizer'}", *_bash_array("QAT_SIZE"),
                 *_bash_array("QAT_BUDGET"), "method=quantgpt", "bits=2"]
    assert "trainer=gpu" in overrides and "model.config.n_layer=12" in overrides
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="run", overrides=quote_int_group_overrides([*overrides,
                                                                              f"paths.output_dir={tmp_path}"]))
    run = RunConfig.from_hydra(cfg)
    assert run.model.config["n_embd"] == 768 and run.task.block_size == 512 and cfg.trainer.precision == "bf16-mixed"
    assert os.path.isdir(run.task.data_dir) and os.path.isdir(run.model.tokenizer)
    assert _bash_array("BENCH")[:4] == ["--size", "gpt2-small", "--device", "cuda"]


@pytest.mark.slow
def test_gpu_check_smoke_mode_runs_every_step_on_cpu(tmp_path):
    """GPU_CHECK_SMOKE=1: the script's three steps at toy sizes on the CPU (about a minute): the
    plumbing that has to work the first time on a GPU machine (data dir, PYTHONPATH, the run's
    metrics.json, the benchmark's table)."""
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "PYTHON": sys.executable, "QGPLM_DATA_DIR": str(SHARED_DATA)}
    proc = subprocess.run(["bash", str(SCRIPT), "", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check: all passed" in proc.stdout and "W2E2A8 student" in proc.stdout
    assert "| quantgpt |" in proc.stdout and (tmp_path / "out" / "qat_run" / "metrics.json").is_file()


def test_loaders_pin_memory_only_for_a_cuda_trainer():
    """Nothing CPU-only on the GPU path: pinned memory when the trainer's device is CUDA, never on CPU."""
    import types

    import torch

    from qgplm.data.sampling import loader_options, resumable_loader

    cuda = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device("cuda", 0)))
    cpu = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device("cpu")))
    assert loader_options(cuda, 2) == {"num_workers": 2, "pin_memory": True, "persistent_workers": True}
    assert loader_options(cpu, 0) == {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
    assert loader_options(None, 0)["pin_memory"] is False
    assert resumable_loader(list(range(8)), 2, 0).pin_memory is False


def test_data_dir_follows_qgplm_data_dir(tmp_path, monkeypatch):
    """QGPLM_DATA_DIR (set by gpu_check.sh for data carried with the repo) moves the config's
    offline paths (paths.data_dir and what derives from it); without it the data beside the repo."""
    from tests.conftest import compose_cfg

    monkeypatch.delenv("QGPLM_DATA_DIR", raising=False)
    assert compose_cfg([], tmp_path).paths.data_dir.endswith("/../shared/data")
    monkeypatch.setenv("QGPLM_DATA_DIR", str(tmp_path / "carried"))
    cfg = compose_cfg([], tmp_path)
    assert cfg.paths.data_dir == str(tmp_path / "carried")
    assert cfg.model.tokenizer == str(tmp_path / "carried" / "gpt2-tokenizer")


def test_run_end_without_a_wandb_logger_never_imports_wandb(monkeypatch):
    """A GPU image without wandb runs logger=csv: the end of a stage must not import it."""
    import types

    from qgplm.pipeline import StageRunner

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    logged = []
    csv = types.SimpleNamespace(log_metrics=lambda m, step: logged.append((m, step)), finalize=lambda s: None)
    trainer = types.SimpleNamespace(loggers=[csv], global_step=3)
    StageRunner.log_final(trainer, {"size/fp32_mib": 1.0}, samples=[{"prompt": "a", "text": "b"}])
    assert logged == [({"size/fp32_mib": 1.0}, 3)]
