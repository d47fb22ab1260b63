"""The paper recipes (conf/experiment/paper_*.yaml): compose and validate offline at every bit-width,
hub names checked as names (never downloaded), docs/recipes.md in step with the configs, and
experiments/compare.py taking them unchanged (its parallel GPU sweep with a stand-in job)."""

from __future__ import annotations

import json
import re
import sys

import pytest
from hydra import compose, initialize_config_dir

from qgplm.cli.run import quote_int_group_overrides
from qgplm.train.config import RunConfig
from tests.conftest import CONF, ROOT

PRESETS = {  # preset -> (task, model kind, hub model)
    "paper_gpt2_wikitext2": ("wikitext2", "causal", "gpt2"),
    "paper_gpt2_ptb": ("ptb", "causal", "gpt2"),
    "paper_gpt2_wikitext103": ("wikitext103", "causal", "gpt2"),
    "paper_gpt2_personachat": ("personachat", "causal", "gpt2"),
    "paper_bart_xsum": ("xsum", "seq2seq", "facebook/bart-base"),
    "paper_bart_cnndm": ("cnndm", "seq2seq", "facebook/bart-base"),
}
# presets whose teacher is a GGUF file (model.gguf_file / the file a package ships), not a hub name
GGUF_PRESETS = {"paper_smollm2_wt2": ("wikitext2", "causal", "smollm2")}  # preset -> (task, model kind, model)
BITS = {"2": "W2E2A8", "4": "W4E4A8", "8": "W8E8A8"}


def _compose(overrides: list[str], tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="run",
                       overrides=quote_int_group_overrides([*overrides, f"paths.output_dir={tmp_path}"]))


def test_every_paper_preset_is_listed_here():
    on_disk = {p.stem for p in (CONF / "experiment").glob("paper_*.yaml")}
    assert on_disk == set(PRESETS) | set(GGUF_PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_composes_and_validates_at_every_bit_width(name, tmp_path):
    from huggingface_hub.utils import validate_repo_id

    from qgplm.models.loading import _is_local, _resolve

    task, kind, hub_model = PRESETS[name]
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_")
    assert "/bits" not in text and "\nbits:" not in text  # bits is the command line's choice
    for bits, tag in BITS.items():
        cfg = _compose([f"experiment={name}", f"bits={bits}"], tmp_path)
        run = RunConfig.from_hydra(cfg)  # validates every owned key
        assert run.quant.tag == tag and run.task.name == task and run.model.kind == kind
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
        # hub names resolve as names (offline: no download, no local dir of that name)
        assert run.model.name_or_path == hub_model and not _is_local(hub_model)
        validate_repo_id(hub_model)
        assert _resolve(hub_model, "model", "model.name_or_path") == (hub_model, True)
        if getattr(run.task, "hub_path", None):  # Persona-Chat's task has no hub data set
            validate_repo_id(run.task.hub_path)
        assert run.task.data_dir is None  # the hub by default; task.data_dir=<dir> for local files
        assert run.stage == "pipeline" and run.teacher.max_steps > 0 and run.student.max_steps > 0
        assert run.student.optim.scale_lr is not None and run.student.optim.weight_decay == 0.0
    default = RunConfig.from_hydra(_compose([f"experiment={name}"], tmp_path))
    assert default.quant.tag == "W2E2A8"  # run.yaml's default bits, not the preset's


@pytest.mark.parametrize("trainer,strategy", [("ddp", "DDPStrategy"), ("fsdp", "FSDPStrategy"),
                                              ("fsdp2", "ModelParallelStrategy"), ("cpu", None)])
def test_preset_takes_the_trainer_from_the_command_line(trainer, strategy, tmp_path):
    for name in ("paper_gpt2_wikitext2", "paper_bart_xsum"):
        cfg = _compose([f"experiment={name}", f"trainer={trainer}", "bits=4"], tmp_path)
        got = cfg.trainer.get("strategy", {}).get("_target_", None)
        assert (got or "").endswith(strategy or "") and (strategy is not None or got is None)
        assert RunConfig.from_hydra(cfg).quant.tag == "W4E4A8"


@pytest.mark.parametrize("name", sorted(GGUF_PRESETS))
def test_gguf_preset_composes_and_validates_at_every_bit_width(name, tmp_path):
    """paper_smollm2_wt2: one GPU in bf16, 512 x 16 tokens per step, ~33M student tokens, the full test set,
    the offline WikiText-2 files and the GGUF teacher (any file through model.gguf_file)."""
    task, kind, model = GGUF_PRESETS[name]
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_")
    assert "/bits" not in text and "\nbits:" not in text
    for bits, tag in BITS.items():
        cfg = _compose([f"experiment={name}", f"bits={bits}"], tmp_path)
        run = RunConfig.from_hydra(cfg)
        assert run.quant.tag == tag and run.task.name == task and run.model.kind == kind and run.model.name == model
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 1 and cfg.trainer.precision == "bf16-mixed"
        assert run.model.name_or_path is None and run.model.gguf_file is None and run.model.gguf_package
        t = run.task
        assert (t.block_size, t.batch_size, t.max_eval_tokens, t.max_train_tokens) == (512, 16, None, None)
        assert t.data_dir.endswith("wikitext-2")
        assert (run.teacher.max_steps, run.teacher.optim.lr) == (1000, 8e-5)
        assert (run.student.max_steps, run.student.optim.lr) == (4000, 4e-4)
        assert run.student.max_steps * t.block_size * t.batch_size == 32_768_000  # the student's tokens
        assert run.student.optim.scale_lr is not None and run.student.optim.weight_decay == 0.0
        assert run.teacher.optim.warmup_steps < run.teacher.max_steps and run.stage == "pipeline"
    path = "/any/where/model.gguf"
    run = RunConfig.from_hydra(_compose([f"experiment={name}", f"model.gguf_file={path}"], tmp_path))
    assert run.model.gguf_file == path and run.quant.tag == "W2E2A8"
    cpu = _compose([f"experiment={name}", "trainer=cpu"], tmp_path)  # the command line's trainer replaces it
    assert cpu.trainer.accelerator == "cpu" and cpu.trainer.precision == "bf16-mixed"


def test_paper_preset_on_the_offline_files_composes(tmp_path):
    """The same recipe on ../shared/data: local data and tokenizer dir instead of the hub."""
    from tests.conftest import SHARED_DATA

    cfg = _compose(["experiment=paper_gpt2_wikitext2", f"task.data_dir={SHARED_DATA / 'wikitext-2'}",
                    "model.name_or_path=null", "+model.config.n_layer=12",
                    f"model.tokenizer={SHARED_DATA / 'gpt2-tokenizer'}"], tmp_path)
    run = RunConfig.from_hydra(cfg)
    assert run.model.name_or_path is None and (SHARED_DATA / "wikitext-2" / "wiki.train.tokens").is_file()


def _recipe_rows() -> dict[str, list[str]]:
    rows = {}
    for line in (ROOT / "docs" / "recipes.md").read_text().splitlines():
        m = re.match(r"\| `experiment=(\w+)` \|(.*)\|$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


def test_docs_recipe_table_matches_the_presets(tmp_path):
    rows = _recipe_rows()
    assert set(rows) == set(PRESETS) | set(GGUF_PRESETS)
    for name in rows:
        run = RunConfig.from_hydra(_compose([f"experiment={name}"], tmp_path))
        t = run.task
        length = (f"{t.block_size}" if t.kind != "summarization"
                  else f"{t.max_source_length} / {t.max_target_length}")
        want = [length, str(t.batch_size), f"{run.teacher.max_steps:,}", f"{run.teacher.optim.lr:g}",
                f"{run.student.max_steps:,}", f"{run.student.optim.lr:g}", f"{run.student.optim.scale_lr:g}"]
        assert rows[name][:7] == want, (name, rows[name][:7], want)


def test_compare_plans_a_paper_preset_unchanged(capsys):
    sys.path.insert(0, str(ROOT / "experiments"))
    from compare import expand_grid, method_sweeps

    sweeps = method_sweeps("quantgpt,pact,lsq,twn", "2,4,8", None, False)
    assert sweeps[0] == ("methods_w2-4-8_quantgpt-pact-lsq", ["method=quantgpt,pact,lsq", "bits=2,4,8"])
    assert sweeps[1] == ("methods_w2_twn", ["method=twn", "bits=2"])
    jobs = expand_grid(sweeps[0][1])
    assert len(jobs) == 9 and jobs[0] == ["method=quantgpt", "bits=2"] and jobs[1] == ["method=quantgpt", "bits=4"]


FAKE_JOB = r"""
import json, os, sys, time
d = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("hydra.run.dir="))
if "method=bad" in sys.argv:
    sys.exit(3)
os.makedirs(d)
time.sleep(0.3)
json.dump({"gpu": os.environ["CUDA_VISIBLE_DEVICES"], "args": sys.argv[1:]}, open(os.path.join(d, "metrics.json"), "w"))
"""


def test_compare_runs_sweep_jobs_one_per_gpu(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "experiments"))
    import compare

    script = tmp_path / "fake_job.py"
    script.write_text(FAKE_JOB)
    monkeypatch.setattr(compare, "qgplm_cmd", lambda args: [sys.executable, str(script), *args])
    sweep = tmp_path / "sweep"
    common = ["experiment=paper_gpt2_wikitext2", "stage=quantize", "teacher_path=/t", "trainer=gpu"]
    failed = compare.run_parallel(sweep, common, ["method=quantgpt,bad,lsq", "bits=2,8"], ["0", "1"])
    assert len(failed) == 2 and all("method=bad" in f for f in failed)
    done = {n: json.loads((sweep / str(n) / "metrics.json").read_text()) for n in (0, 1, 4, 5)}
    assert {m["gpu"] for m in done.values()} == {"0", "1"}
    assert done[5]["args"][:4] == common and done[5]["args"][4:6] == ["method=lsq", "bits=8"]
    # the same sweep again: the finished jobs are skipped, the failed ones (no dir left) re-run
    capsys.readouterr()
    failed = compare.run_parallel(sweep, common, ["method=quantgpt,bad,lsq", "bits=2,8"], ["0"])
    assert len(failed) == 2 and capsys.readouterr().out.count("(done)") == 4
