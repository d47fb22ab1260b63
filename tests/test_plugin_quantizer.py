"""A quantizer added from outside qgplm: one module (tests/plugins/toy_quantizer.py) plus one method
file (tests/plugins/conf/method/toy.yaml, added through Hydra's search path), nothing under qgplm/
changed. It is selected, trained with the callback its kind declares, checkpointed and exported
through the normal entry points, and the export reproduces the trained student exactly."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from qgplm.errors import QgplmError
from qgplm.train.config import RunConfig
from qgplm.train.pipeline import run_stages
from tests.conftest import ROOT, TINY, compose_cfg, run_cli

PLUGINS = ROOT / "tests" / "plugins"
SEARCH_PATH = f"hydra.searchpath=[file://{PLUGINS / 'conf'}]"


def test_plugin_quantizer_trains_with_its_callback_and_exports_exactly(tmp_path):
    from qgplm.export import load_quantized
    from qgplm.quant import quantized_modules
    from qgplm.train.student import load_student

    cfg = compose_cfg([SEARCH_PATH, "method=toy", "generate_samples=0"], tmp_path)
    run = RunConfig.from_hydra(cfg)
    assert run.method.quantizer == "tests.plugins.toy_quantizer.ToyQuantizer"
    metrics = run_stages(run, cfg.trainer, cfg.get("logger"), cfg.get("callbacks"))
    assert metrics["config"]["method"] == "toy" and metrics["student"]["test_ppl"] > 1
    assert "error" not in metrics["export"], metrics["export"]

    # the kind's own callback ran in the student fit and travelled with the checkpoint
    ckpt = torch.load(tmp_path / "checkpoints" / "student" / "last.ckpt", weights_only=True)
    counters = [v for k, v in ckpt["callbacks"].items() if "ToyBatchCounter" in k]
    assert counters and counters[0]["batches"] == run.student.max_steps

    manifest = json.loads((tmp_path / "export" / "qgplm_export.json").read_text())
    assert manifest["quantizer"] == ["toy"]
    assert {p["method"] for p in manifest["packed"].values()} == {"toy"}

    (tmp_path / ".hydra").mkdir()  # what qgplm.run writes: the run's config, which load_student reads
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml", resolve=True)
    student, _ = load_student(str(tmp_path))
    assert {type(m.weight_quantizer).__name__ for _, m in quantized_modules(student)} == {"ToyQuantizer"}
    loaded = load_quantized(tmp_path / "export")
    ids = torch.randint(0, student.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(student(ids).logits, loaded(ids).logits)


def test_plugin_quantizer_through_the_command_line(tmp_path):
    proc = run_cli([*TINY, SEARCH_PATH, "method=toy", "trainer.fast_dev_run=true", "generate_samples=0",
                    f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["method"] == "toy"


@pytest.mark.parametrize("path, expected", [
    ("tests.plugins.no_such_module.ToyQuantizer", "cannot import tests.plugins.no_such_module"),
    ("tests.plugins.toy_quantizer.NoSuchClass", "unknown quantizer"),
    ("tests.plugins.toy_quantizer.ToyBatchCounter", "not a registered quantizer"),
])
def test_a_bad_quantizer_path_is_one_clear_error(tmp_path, path, expected):
    cfg = compose_cfg([f"method.quantizer={path}"], tmp_path)
    with pytest.raises(QgplmError, match=expected):
        RunConfig.from_hydra(cfg)


def test_a_kind_without_codes_is_refused_by_the_export_in_one_line(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from qgplm.export import export_model
    from qgplm.quant import QuantConfig, initialize_quantizers, quantize_model, register_weight_quantizer
    from tests.plugins.toy_quantizer import ToyQuantizer

    @register_weight_quantizer("toy_without_codes", export="none")
    class NoCodes(ToyQuantizer):
        pass

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16, vocab_size=50))
    model = quantize_model(model, QuantConfig(quantizer="toy_without_codes"))
    initialize_quantizers(model)
    with pytest.raises(QgplmError, match="'toy_without_codes' has no integer codes"):
        export_model(model, tmp_path / "out")
    with pytest.raises(ValueError, match="export='packed'"):
        register_weight_quantizer("toy_bad_export", export="packed")


def test_only_laq_among_qgplm_kinds_brings_a_callback():
    """The registry carries what `train_student` used to special-case by name: LAQ's curvature feed."""
    from qgplm.quant import QUANTIZER_KINDS
    from qgplm.train.callbacks import LAQCurvatureCallback

    builtin = {"quantgpt", "pact", "lsq", "laq", "twn", "minmax", "quantgpt_pact_grad"}
    assert builtin <= set(QUANTIZER_KINDS)
    for name in builtin:
        types = [type(cb) for cb in QUANTIZER_KINDS[name].make_callbacks()]
        assert types == ([LAQCurvatureCallback] if name == "laq" else []), name
        assert QUANTIZER_KINDS[name].export == "codes"


def test_plugin_task_and_plugin_quantizer_together(tmp_path):
    """Both extension points at once, from the tests folder only: the toy task kind trained and
    evaluated with the toy quantizer, through the command line (fast_dev_run)."""
    proc = run_cli([SEARCH_PATH, "task=toy", "method=toy", "model.config.n_layer=1", "model.config.n_embd=32",
                    "model.config.n_head=2", "model.config.n_positions=32", "logger=none", "generate_samples=0",
                    "trainer.fast_dev_run=true", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["task"] == "toy" and metrics["config"]["method"] == "toy"
    assert "next_token_accuracy" in metrics["student"] and metrics["counting"] == {"sentences_per_split": 200}
    manifest = json.loads((tmp_path / "export" / "qgplm_export.json").read_text())
    assert manifest["quantizer"] == ["toy"]
