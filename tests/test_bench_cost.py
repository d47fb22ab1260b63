"""The CPU-runnable parts of experiments/gpu_check.sh: the cost benchmark at tiny sizes (bf16-mixed
on CPU, in-process), the script's syntax and its clear refusals, and its QAT run's overrides."""

from __future__ import annotations

import argparse
import json
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
                precision="bf16-mixed", size=None, json=False, one=None, settings="fp")
    return argparse.Namespace(**{**base, **kw})


def _bench():
    sys.path.insert(0, str(ROOT / "experiments"))
    import bench_cost

    return bench_cost


@pytest.mark.parametrize("setting", ["fp", "kd_only", "quantgpt"])
def test_bench_cost_measures_tiny_bf16_on_cpu(setting):
    bench = _bench()
    row = bench.measure(setting, _args())
    assert row["precision"] == "bf16-mixed" and row["device"] == "cpu"
    assert row["step_s"] > 0 and row["peak_rss_mib"] >= row["setup_rss_mib"] > 0 and math.isfinite(row["loss"])
    assert row["tokens_per_s"] == pytest.approx(2 * 16 / row["step_s"])
    assert (row["contrastive_s"] is not None) == (setting == "quantgpt")
    if setting == "quantgpt":
        assert 0 < row["contrastive_s"]
        assert row["contrastive_share"] == pytest.approx(row["contrastive_s"] / row["step_s"])
    assert bench.SIZES["gpt2-small"] == (12, 768, 50257)


def _run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_cost.py"), *args], capture_output=True,
                          text=True, env=env, timeout=600)


def _torchao_skip_reason() -> str | None:
    return _bench().torchao_missing()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_bench_cost_tiny_llama_table_has_every_column(precision):
    """--size tiny_llama, --settings fp,quantgpt (and torchao where .bench_deps has it): one row per
    setting in the order asked, every column filled, the target ratios printed."""
    settings = "quantgpt,fp" + ("" if _torchao_skip_reason() else ",torchao")
    proc = _run_bench("--size", "tiny_llama", "--steps", "1", "--warmup", "1", "--block", "16", "--batch", "2",
                      "--precision", precision, "--settings", settings, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith(f"tiny random Llama (2 x 64, vocab 256), batch 2 x 16, cpu, {precision}")
    header = next(line for line in out.splitlines() if line.startswith("| setting"))
    for col in ("step time (s)", "vs fp", "tokens/s", "contrastive + bank (s)", "share of step", "peak RSS (MiB)",
                "RSS after set-up (MiB)"):
        assert f"| {col} |" in header
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| setting")]
    assert [r.split(" | ")[0][2:] for r in rows] == settings.split(",")
    assert all(len(r.split(" | ")) == len(header.split(" | ")) for r in rows)
    quantgpt = rows[0].split(" | ")
    assert quantgpt[4] != "-" and quantgpt[5].endswith("%")  # the contrastive + bank share
    assert rows[1].split(" | ")[2] == "1.00x"  # fp against itself
    assert re.search(r"QuantGPT / FP step time: \d+\.\d\dx \(target <= 1.4", out)
    assert re.search(r"contrastive loss \+ memory bank: \d+\.\d% of the QuantGPT step \(target <= 5%\)", out)
    json_rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["setting"] for r in json_rows] == settings.split(",")
    assert all(r["precision"] == precision and r["peak_rss_mib"] > 0 for r in json_rows)
    assert ("qgplm / torchao step time" in out) == ("torchao" in settings)


def test_bench_cost_torchao_setting_quantizes_the_w2e2a8_layers():
    """The torchao student: int2 per-channel weights and int8 per-token asymmetric activations on
    every Linear (the tied LM head included), an int2 token embedding, the tie kept; a step runs."""
    why = _torchao_skip_reason()
    if why:
        pytest.skip(f"the torchao setting is not tested: {why}")
    bench = _bench()
    bench.use_bench_deps()
    import torch
    from torch import nn

    a = _args(size="tiny_llama", precision="32-true")
    teacher = bench.build_teacher(a)
    student = bench.torchao_student(teacher)
    from torchao.quantization.qat.embedding import FakeQuantizedEmbedding
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    linears = [m for m in student.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, FakeQuantizedLinear) for m in linears)
    assert len(linears) == sum(isinstance(m, nn.Linear) for m in teacher.modules())
    wcfg = linears[0].weight_fake_quantizer.config
    acfg = linears[0].activation_fake_quantizer.config
    assert wcfg.dtype == torch.int2 and type(wcfg.granularity).__name__ == "PerAxis"
    assert acfg.dtype == torch.int8 and type(acfg.granularity).__name__ == "PerToken"
    assert "ASYMMETRIC" in str(acfg.mapping_type) and "ASYMMETRIC" not in str(wcfg.mapping_type)
    assert isinstance(student.get_input_embeddings(), FakeQuantizedEmbedding)
    assert student.lm_head.weight is student.get_input_embeddings().weight
    row = bench.measure("torchao", a)
    assert row["step_s"] > 0 and math.isfinite(row["loss"]) and row["contrastive_s"] > 0


def test_bench_cost_refuses_bad_settings_and_a_missing_torchao(tmp_path):
    proc = _run_bench("--size", "tiny", "--settings", "fp,nope")
    assert proc.returncode == 2 and "error: --settings 'fp,nope': unknown setting nope" in proc.stderr
    assert _bench().parse_settings("fp, quantgpt,fp") == ["fp", "quantgpt"]
    bench = _bench()
    saved = bench.BENCH_DEPS
    try:
        bench.BENCH_DEPS = tmp_path / "absent"
        assert "run `make bench-deps`" in bench.torchao_missing()
    finally:
        bench.BENCH_DEPS = saved


def test_bench_cost_refuses_cuda_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit, match="cuda"):
        _bench().measure("fp", _args(device="cuda"))


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
