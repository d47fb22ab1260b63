"""The CPU-runnable parts of experiments/gpu_check.sh: the cost benchmark at tiny sizes (bf16-mixed
on CPU, in-process), the script's syntax and its clear refusals, its runs' overrides, the search for
step 4's GGUF file, and (slow) every step end to end in smoke mode."""

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
                precision="bf16-mixed", size=None, json=False, one=None, settings="fp", cpu_allocator="system")
    return argparse.Namespace(**{**base, **kw})


def _bench():
    sys.path.insert(0, str(ROOT / "experiments"))
    import bench_cost

    return bench_cost


@pytest.mark.parametrize("setting", ["fp", "kd_only", "quantgpt", "quantgpt_token"])
def test_bench_cost_measures_tiny_bf16_on_cpu(setting):
    bench = _bench()
    row = bench.measure(setting, _args())
    assert row["precision"] == "bf16-mixed" and row["device"] == "cpu"
    assert row["step_s"] > 0 and row["peak_rss_mib"] >= row["setup_rss_mib"] > 0 and math.isfinite(row["loss"])
    assert row["tokens_per_s"] == pytest.approx(2 * 16 / row["step_s"])
    contrastive = setting.startswith("quantgpt")
    assert (row["contrastive_s"] is not None) == contrastive
    if contrastive:
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
    settings = "quantgpt,fp,quantgpt_token" + ("" if _torchao_skip_reason() else ",torchao")
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
    assert ("qgplm per-token / torchao step time" in out) == ("torchao" in settings)


@pytest.mark.parametrize(("setting", "granularity"), [("quantgpt", "tensor"), ("quantgpt_token", "token")])
def test_bench_cost_quantgpt_settings_differ_only_in_activation_granularity(setting, granularity):
    """quantgpt_token is the like-for-like partner of torchao's per-token int8 activations: every
    activation quantizer of its student is per token, and its weights are QuantGPT's 2-bit ones."""
    from qgplm.quant import ActivationQuantizer, DynamicScaleQuantizer

    bench = _bench()
    a = _args(size="tiny_llama", precision="32-true")
    module, bank = bench.build_module(setting, bench.build_teacher(a), a)
    acts = [m for m in module.student.modules() if isinstance(m, ActivationQuantizer)]
    weights = [m for m in module.student.modules() if isinstance(m, DynamicScaleQuantizer)]
    assert acts and {q.granularity for q in acts} == {granularity}
    assert weights and {q.bits for q in weights} == {2}
    assert bank is not None


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

    from qgplm.cli.run import quote_int_group_overrides
    from qgplm.train.config import RunConfig

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


def test_gpu_check_smollm2_step_overrides_validate(tmp_path):
    """Step 4's run: experiment=paper_smollm2_wt2 with the check's shorter budget, from a GGUF path."""
    from hydra import compose, initialize_config_dir

    from qgplm.cli.run import quote_int_group_overrides
    from qgplm.train.config import RunConfig

    assert _bash_array("SMOL_SIZE") == [] and _bash_array("SMOL_TRAINER") == []  # the preset's sizes, its GPU
    overrides = ["experiment=paper_smollm2_wt2", "model.gguf_file=/gpu/shared/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                 f"task.data_dir={SHARED_DATA / 'wikitext-2'}", *_bash_array("SMOL_BUDGET"), "method=quantgpt",
                 "bits=2"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="run", overrides=quote_int_group_overrides([*overrides,
                                                                              f"paths.output_dir={tmp_path}"]))
    run = RunConfig.from_hydra(cfg)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.max_time == "00:00:04:00"  # Lightning's DD:HH:MM:SS: a cap per stage
    assert (run.task.block_size, run.task.batch_size, run.task.max_eval_tokens) == (512, 16, None)
    assert 10 <= run.teacher.max_steps <= 100 and 100 <= run.student.max_steps <= 1000
    assert run.student.eval_every == run.student.max_steps and run.model.gguf_file.endswith(".gguf")


def _gpu_check(tmp_path, steps: str, **env: str) -> subprocess.CompletedProcess:
    """The script in smoke mode with only `steps`, its bundle and ../shared replaced by folders under tmp_path."""
    for d in ("bundle/models", "shared/models"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    full = {**{k: v for k, v in os.environ.items() if k != "GPU_CHECK_GGUF"}, "GPU_CHECK_SMOKE": "1",
            "GPU_CHECK_STEPS": steps, "PYTHON": sys.executable, "QGPLM_DATA_DIR": str(SHARED_DATA),
            "GPU_CHECK_BUNDLE": str(tmp_path / "bundle"), "GPU_CHECK_SHARED": str(tmp_path / "shared"), **env}
    return subprocess.run(["bash", str(SCRIPT), "", str(tmp_path / "out")], capture_output=True, text=True, env=full,
                          timeout=900)  # the skip path imports torch, lightning and transformers twice


def test_gpu_check_finds_the_gguf_in_order_or_says_why_it_skips(tmp_path):
    """GPU_CHECK_GGUF, then .gpu_bundle/models, then ../shared/models; a file that is no GGUF file and a step list
    naming no step stop the script with one error line before any run; no file at all skips step 4, saying so."""
    proc = _gpu_check(tmp_path, "4 9")
    assert proc.returncode == 2 and 'names step "9"' in proc.stderr
    not_gguf = b"PK\x03\x04 no gguf"
    (tmp_path / "shared/models/SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(not_gguf)
    proc = _gpu_check(tmp_path, "4")
    assert proc.returncode == 2 and f"{tmp_path}/shared/models/SmolLM2-135M-Instruct.Q4_1.gguf" in proc.stderr
    assert "is not a GGUF file" in proc.stderr
    (tmp_path / "bundle/models/SmolLM2-135M-Instruct.Q8_0.gguf").write_bytes(not_gguf)
    proc = _gpu_check(tmp_path, "4")
    assert proc.returncode == 2 and f"{tmp_path}/bundle/models/SmolLM2-135M-Instruct.Q8_0.gguf" in proc.stderr
    (tmp_path / "mine.gguf").write_bytes(not_gguf)
    proc = _gpu_check(tmp_path, "4", GPU_CHECK_GGUF=str(tmp_path / "mine.gguf"))
    assert proc.returncode == 2 and f"{tmp_path}/mine.gguf (from GPU_CHECK_GGUF)" in proc.stderr
    proc = _gpu_check(tmp_path, "4", GPU_CHECK_GGUF=str(tmp_path / "missing.gguf"))
    assert proc.returncode == 2 and "GPU_CHECK_GGUF=" in proc.stderr and "is not a file" in proc.stderr
    assert not (tmp_path / "out").exists()  # every refusal came before anything was written
    for f in (tmp_path / "shared/models").iterdir():
        f.unlink()
    for f in (tmp_path / "bundle/models").iterdir():
        f.unlink()
    proc = _gpu_check(tmp_path, "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gpu_check: step 4 skipped: no SmolLM2-135M-Instruct*.gguf in" in proc.stdout
    assert "all passed" in proc.stdout and "(step 4 skipped: no SmolLM2 GGUF file)" in proc.stdout


@pytest.mark.slow
def test_gpu_check_smoke_mode_runs_every_step_on_cpu(tmp_path):
    """GPU_CHECK_SMOKE=1: the script's four steps at toy sizes on the CPU (a few minutes), step 4 on a tiny
    random Llama written to GGUF here: the plumbing that has to work the first time on a GPU machine (data dir,
    PYTHONPATH, the GGUF teacher, the runs' metrics.json, the benchmark's table, the printed figures)."""
    from tests.test_gguf_teacher import tiny_llama_gguf

    _, _, gguf_path = tiny_llama_gguf(tmp_path / "tiny-llama.gguf")
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "PYTHON": sys.executable, "QGPLM_DATA_DIR": str(SHARED_DATA),
           "GPU_CHECK_GGUF": str(gguf_path)}
    env.pop("GPU_CHECK_STEPS", None)
    proc = subprocess.run(["bash", str(SCRIPT), "", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "gpu_check: all passed" in out and "W2E2A8 student" in out and "skipped" not in out
    assert "| quantgpt |" in out and (tmp_path / "out" / "qat_run" / "metrics.json").is_file()
    assert f"teacher: {gguf_path} (from GPU_CHECK_GGUF)" in out
    m = re.search(r"W2E2A8 QuantGPT student PPL ([0-9.]+)", out)
    assert m and math.isfinite(float(m.group(1)))
    assert re.search(r"student training [0-9,]+ tokens/s \(\d+ ms per step of 128 tokens, 4 of 4 steps run\)", out)
    assert re.search(r"teacher training [0-9,]+ tokens/s \(\d+ ms per step of 128 tokens, 2 of 2 steps run\)", out)
    metrics = json.loads((tmp_path / "out" / "smollm2_run" / "metrics.json").read_text())
    assert metrics["config"]["model"] == "smollm2" and metrics["student"]["train_throughput"]["tokens"] == 4 * 128


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

    from qgplm.train.pipeline import StageRunner

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    logged = []
    csv = types.SimpleNamespace(log_metrics=lambda m, step: logged.append((m, step)), finalize=lambda s: None)
    trainer = types.SimpleNamespace(loggers=[csv], global_step=3)
    StageRunner.log_final(trainer, {"size/fp32_mib": 1.0}, samples=[{"prompt": "a", "text": "b"}])
    assert logged == [({"size/fp32_mib": 1.0}, 3)]
