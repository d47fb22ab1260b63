"""No file a user passes runs code (docs/security.md).

For each kind of file qgplm reads (checkpoints, teacher dirs, exports, GGUF, ONNX, tokenizer
dirs, run configs), a copy whose loading would run a payload is passed to the real command line:
the payload's marker file is never created, and the command ends in one `error:` line with exit
code 2. The payloads are built here with pickle (the attack), never loaded by qgplm.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from qgplm.errors import QgplmError
from qgplm.train.resume import read_identity
from tests.conftest import ROOT, SHARED_DATA, compose_cfg, main_error


class _Payload:
    """Unpickling this calls os.system(touch <marker>): what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def torch_payload(path: Path, marker: Path, extra: dict | None = None) -> None:
    """A torch file that looks like a qgplm checkpoint and runs the payload when unpickled."""
    torch.save({"qgplm": {"stage": "student"}, "state_dict": {}, **(extra or {}), "x": _Payload(marker)}, path)


def raw_payload(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Payload(marker)))


def run_error(cfg, capsys) -> str:
    """`qgplm.run` in-process on a composed config: exit 2 with one error line (earlier in-process runs
    left handlers on pytest's captured streams, closed since: quiet_console removes them)."""
    from qgplm.cli.run import execute

    with pytest.raises(SystemExit) as e:
        execute(cfg)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def fake_run_dir(root: Path) -> Path:
    """What `qgplm.export ckpt=` reads of a finished tiny run, written directly (no training): its
    .hydra/config.yaml and teacher/ (a tiny GPT-2 with GPT-2's tokenizer)."""
    from omegaconf import OmegaConf
    from transformers import GPT2Config, GPT2LMHeadModel

    run = root / "run"
    cfg = compose_cfg(["stage=pipeline", "model.config.n_embd=16"], run)
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64)).save_pretrained(run / "teacher")
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(SHARED_DATA / "gpt2-tokenizer" / f, run / "teacher" / f)
    (run / "checkpoints" / "student").mkdir(parents=True)
    return run


# ---------------------------------------------------------------- checkpoints

def test_read_identity_refuses_a_payload_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    torch_payload(tmp_path / "last.ckpt", marker)
    with pytest.raises(QgplmError, match=r"holds a Python object \(posix.system\).*could run code"):
        read_identity(tmp_path / "last.ckpt")
    assert not marker.exists()


def test_resume_from_a_run_dir_with_a_payload_checkpoint(tiny_cfg, tmp_path, capsys):
    """ckpt_path=<run dir> whose checkpoints/student/last.ckpt carries code: refused unrun."""
    marker = tmp_path / "ran"
    crafted = tmp_path / "crafted_run"
    (crafted / "checkpoints" / "student").mkdir(parents=True)
    torch_payload(crafted / "checkpoints" / "student" / "last.ckpt", marker)
    err = run_error(tiny_cfg("stage=pipeline", f"ckpt_path={crafted}"), capsys)
    assert not marker.exists()
    assert "could run code" in err and "last.ckpt" in err
    assert not (tmp_path / "metrics.json").exists()


def test_export_from_a_payload_checkpoint(tmp_path, capsys):
    from qgplm.cli.export import main

    marker = tmp_path / "ran"
    run = fake_run_dir(tmp_path)
    for name in ("best.ckpt", "last.ckpt"):
        torch_payload(run / "checkpoints" / "student" / name, marker)
    err = main_error(main, [f"ckpt={run}", f"out={tmp_path / 'out'}"], capsys)
    assert not marker.exists() and "could run code" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- Hydra _target_ in configs

@pytest.mark.parametrize("override, expected", [
    ("+callbacks.evil._target_=os.system", "callbacks.evil._target_=os.system is not an allowed class"),
    ("trainer._target_=subprocess.Popen", "trainer._target_=subprocess.Popen is not an allowed class"),
    ("+trainer.strategy._target_=builtins.exec", "trainer.strategy._target_=builtins.exec is not an allowed"),
    ("+callbacks.f._target_=qgplm.train.resume.read_identity",
     "callbacks.f._target_=qgplm.train.resume.read_identity is not an importable class"),
])
def test_a_target_outside_the_allowlist_is_refused(tiny_cfg, tmp_path, capsys, override, expected):
    err = run_error(tiny_cfg("stage=teacher", override), capsys)
    assert expected in err
    assert not (tmp_path / "teacher").exists()


def test_allowlist_extended_from_the_environment(monkeypatch):
    from omegaconf import OmegaConf

    from qgplm.train.targets import check_targets

    cfg = OmegaConf.create({"mine": {"_target_": "collections.OrderedDict"}})
    with pytest.raises(QgplmError, match="is not an allowed class"):
        check_targets(cfg, "callbacks")
    monkeypatch.setenv("QGPLM_ALLOW_TARGETS", "collections.")
    check_targets(cfg, "callbacks")
    for section in ("trainer", "callbacks", "logger"):  # every shipped config passes
        for f in (ROOT / "conf" / section).glob("*.yaml"):
            check_targets(OmegaConf.load(f), section)


# ---------------------------------------------------------------- model, tokenizer and export dirs

def evil_module(path: Path, marker: Path) -> None:
    """A Python file that creates the marker when imported: what an auto_map would run."""
    path.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")


def tiny_model_dir(d: Path, tokenizer: bool = True) -> Path:
    """A tiny GPT-2 saved with save_pretrained (safetensors), with GPT-2's bare BPE tokenizer files."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64)).save_pretrained(d)
    if tokenizer:
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(SHARED_DATA / "gpt2-tokenizer" / f, d / f)
    return d


def bin_payload_dir(d: Path, marker: Path, keep_safetensors: bool) -> Path:
    """A model dir whose pytorch_model.bin holds the real weights plus a payload."""
    from safetensors.torch import load_file

    tiny_model_dir(d)
    weights = load_file(d / "model.safetensors")
    torch.save({**weights, "x": _Payload(marker)}, d / "pytorch_model.bin")
    if not keep_safetensors:
        (d / "model.safetensors").unlink()
    return d


@pytest.fixture
def answer_yes(monkeypatch):
    """A user who answers "y" to transformers' "Do you wish to run the custom code?" prompt (what it
    asks when trust_remote_code is left unset): qgplm passes False, so it is never asked."""
    asked = []

    def yes(prompt=""):
        asked.append(prompt)
        return "y"

    monkeypatch.setattr(builtins, "input", yes)
    return asked


def test_teacher_dir_with_a_pickled_bin_is_refused_by_run(tiny_cfg, tmp_path, capsys):
    """qgplm.run stage=quantize teacher_path=<dir with only pytorch_model.bin carrying a payload>."""
    marker = tmp_path / "ran"
    teacher = bin_payload_dir(tmp_path / "teacher_dir", marker, keep_safetensors=False)
    err = run_error(tiny_cfg("stage=quantize", f"teacher_path={teacher}"), capsys)
    assert not marker.exists()
    assert "hold a Python object (posix.system)" in err and "could run code" in err, err


def test_a_pickled_bin_beside_safetensors_is_never_read(tmp_path):
    from qgplm.models import load_pretrained

    marker = tmp_path / "ran"
    model = load_pretrained(str(bin_payload_dir(tmp_path / "m", marker, keep_safetensors=True)))
    assert not marker.exists() and model.config.n_embd == 16


def test_model_config_auto_map_is_not_imported(tmp_path, capsys, answer_yes):
    """export model=<dir> whose config.json points auto_map at Python files in the dir."""
    from qgplm.cli.export import main

    marker = tmp_path / "ran"
    d = tiny_model_dir(tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                               "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (d / "config.json").write_text(json.dumps(config))
    for f in ("configuration_evil.py", "modeling_evil.py"):
        evil_module(d / f, marker)
    err = main_error(main, [f"model={d}", f"out={tmp_path / 'out'}"], capsys)
    assert not marker.exists() and not answer_yes
    assert "asks for custom Python code (auto_map" in err, err
    assert not (tmp_path / "out").exists()


def test_tokenizer_auto_map_is_not_imported(tmp_path, capsys, answer_yes):
    """export model=<dir> with sound weights whose tokenizer_config.json asks for tokenization_evil.py."""
    from qgplm.cli.export import main

    marker = tmp_path / "ran"
    d = tiny_model_dir(tmp_path / "m", tokenizer=False)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    evil_module(d / "tokenization_evil.py", marker)
    err = main_error(main, [f"model={d}", f"out={tmp_path / 'out'}"], capsys)
    assert not marker.exists() and not answer_yes
    # config.json names GPT-2, so transformers ignores the auto_map and finds no GPT-2 tokenizer files
    assert "cannot load a tokenizer" in err or "asks for custom Python code" in err, err


def test_tokenizer_dir_alone_with_auto_map(tmp_path, answer_yes):
    """model.tokenizer=<dir> (no config.json: nothing but the auto_map says which class)."""
    from qgplm.models import load_tokenizer

    marker = tmp_path / "ran"
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    evil_module(d / "tokenization_evil.py", marker)
    raw_payload(d / "vocab.pkl", marker)  # no transformers tokenizer reads pickles; never opened
    with pytest.raises(QgplmError, match=r"model.tokenizer=.* asks for custom Python code"):
        load_tokenizer(str(d))
    assert not marker.exists() and not answer_yes


# ---------------------------------------------------------------- YAML: run configs and experiment files

PYTHON_TAG = "!!python/object/apply:os.system [\"touch {marker}\"]"


def test_run_config_with_a_python_tag_is_refused_by_export(tmp_path, capsys):
    """export ckpt=<run dir> whose .hydra/config.yaml carries a !!python tag."""
    from qgplm.cli.export import main

    marker = tmp_path / "ran"
    run = fake_run_dir(tmp_path)
    cfg = run / ".hydra" / "config.yaml"
    cfg.write_text(cfg.read_text() + f"evil: {PYTHON_TAG.format(marker=marker)}\n")
    torch.save({"qgplm": {"stage": "student"}, "state_dict": {}}, run / "checkpoints" / "student" / "last.ckpt")
    err = main_error(main, [f"ckpt={run}", f"out={tmp_path / 'out'}"], capsys)
    assert not marker.exists()
    assert "config.yaml" in err and "python/object" in err, err


def cli_error(argv: list[str], capsys) -> str:
    """`python -m qgplm.run <argv>` in-process (qgplm.run.cli, Hydra included): one error line, exit 2."""
    from hydra.core.global_hydra import GlobalHydra

    from qgplm.cli.run import cli

    old = sys.argv
    sys.argv = ["qgplm.run", *argv]
    try:
        with pytest.raises(SystemExit) as e:
            cli()
    finally:
        sys.argv = old
        GlobalHydra.instance().clear()
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("body, expected", [
    ("teacher:\n  max_steps: {tag}\n", r"could not determine a constructor for the tag.*python/object/apply"),
    ("callbacks:\n  evil:\n    _target_: os.system\n    _args_: [\"touch {marker}\"]\n",
     r"callbacks.evil._target_=os.system is not an allowed class"),
])
def test_experiment_file_with_code_is_refused(tmp_path, capsys, monkeypatch, body, expected):
    """An experiment file someone hands you, passed as +experiment=<name> from its own config dir."""
    marker = tmp_path / "ran"
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "handed.yaml").write_text("# @package _global_\n" + body.format(tag=PYTHON_TAG.format(marker=marker),
                                                                           marker=marker))
    monkeypatch.chdir(tmp_path)
    err = cli_error([f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=handed", "logger=none",
                     f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert not marker.exists()
    assert re.search(expected, err), err
    assert not (tmp_path / "run" / "teacher").exists()


# ---------------------------------------------------------------- GGUF, packed exports, ONNX

def test_corrupt_gguf_file_is_one_error_line(tiny_cfg, tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(256))
    err = run_error(tiny_cfg("stage=teacher", f"+model.gguf_file={bad}"), capsys)
    assert "model.gguf" in err and ("truncated or corrupt" in err or "not a GGUF" in err), err


@pytest.fixture
def packed_export(tmp_path):
    from transformers import GPT2TokenizerFast

    from qgplm.export.format.writer import export_model
    from qgplm.models import load_pretrained

    d = tiny_model_dir(tmp_path / "m")
    tok = GPT2TokenizerFast.from_pretrained(str(d))
    export_model(load_pretrained(str(d)), tmp_path / "export", tok)
    return tmp_path / "export"


def relist(export: Path, *names: str) -> None:
    """Record files in the manifest with their true checksums (a tamperer can rewrite it too)."""
    from qgplm.export.format.manifest import MANIFEST, sha256_file

    manifest = json.loads((export / MANIFEST).read_text())
    for name in names:
        manifest["files"][name] = sha256_file(export / name)
    (export / MANIFEST).write_text(json.dumps(manifest))


def test_packed_export_never_unpickles_an_extra_file(packed_export, tmp_path, capsys):
    """A pytorch_model.bin payload beside the export's safetensors, even listed in the manifest:
    generate reads the safetensors only."""
    from qgplm.cli.generate import main

    marker = tmp_path / "ran"
    torch_payload(packed_export / "pytorch_model.bin", marker)
    raw_payload(packed_export / "extra.pkl", marker)
    relist(packed_export, "pytorch_model.bin", "extra.pkl")
    assert main([f"dir={packed_export}", "prompt=hello", "max_new_tokens=2"]) == 0
    assert not marker.exists()


@pytest.mark.parametrize("tamper", ["auto_map", "model_class"])
def test_packed_export_with_a_tampered_manifest_or_config(packed_export, tmp_path, capsys, answer_yes, tamper):
    from qgplm.cli.generate import main
    from qgplm.export.format.manifest import MANIFEST

    marker = tmp_path / "ran"
    if tamper == "auto_map":
        config = json.loads((packed_export / "config.json").read_text())
        config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
        (packed_export / "config.json").write_text(json.dumps(config))
        evil_module(packed_export / "configuration_evil.py", marker)
        relist(packed_export, "config.json", "configuration_evil.py")
        expected = "asks for custom Python code"
    else:
        manifest = json.loads((packed_export / MANIFEST).read_text())
        manifest["model_class"] = "set_seed"  # a transformers callable, not a model class
        (packed_export / MANIFEST).write_text(json.dumps(manifest))
        expected = "is not a transformers model class"
    err = main_error(main, [f"dir={packed_export}", "prompt=hello", "max_new_tokens=2"], capsys)
    assert not marker.exists() and not answer_yes
    assert expected in err, err


# Source audit: what would unpickle a file or run a folder's code, anywhere in qgplm (the ONNX and
# GGUF paths included: onnx.load / onnxruntime and gguf-py read protobuf and numpy, not pickle).
UNSAFE = [
    (r"\bimport pickle\b|\bpickle\.loads?\(|\bdill\b|\bjoblib\b|\bcloudpickle\b", "a pickle reader"),
    (r"weights_only\s*=\s*False", "torch.load(weights_only=False)"),
    (r"allow_pickle\s*=\s*True", "numpy allow_pickle=True"),
    (r"trust_remote_code\s*=\s*True", "trust_remote_code=True"),
    (r"yaml\.(unsafe_)?load\(|yaml\.Loader\b|UnsafeLoader|FullLoader", "an unsafe YAML loader"),
    (r"(?<![\w.])(eval|exec)\(", "eval/exec"),
]


def code_lines(path: Path) -> dict[int, str]:
    """Each line of the file with its strings (docstrings) and comments blanked out."""
    import tokenize

    lines = [list(line) for line in path.read_text().splitlines()]
    with open(path, "rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type in (tokenize.STRING, tokenize.COMMENT):
                (r0, c0), (r1, c1) = tok.start, tok.end
                for r in range(r0, r1 + 1):
                    row = lines[r - 1]
                    row[c0 if r == r0 else 0:c1 if r == r1 else len(row)] = " " * (
                        (c1 if r == r1 else len(row)) - (c0 if r == r0 else 0))
    return {n: "".join(row) for n, row in enumerate(lines, 1)}


def test_no_unsafe_reader_in_the_source():
    hits = []
    for f in sorted((ROOT / "qgplm").rglob("*.py")):
        for n, code in sorted(code_lines(f).items()):
            hits += [f"{f.relative_to(ROOT)}:{n}: {what}" for pattern, what in UNSAFE if re.search(pattern, code)]
            if "torch.load(" in code and f.name != "safeload.py":
                hits.append(f"{f.relative_to(ROOT)}:{n}: torch.load outside qgplm/safeload.py")
            if ".from_pretrained(" in code:
                # every from_pretrained of a folder a user passes says trust_remote_code=False itself
                call = " ".join(f.read_text().splitlines()[n - 1:n + 2])
                if "trust_remote_code=False" not in call and "NO_REMOTE_CODE" not in call and \
                        "bare_bpe_class" not in call:
                    hits.append(f"{f.relative_to(ROOT)}:{n}: from_pretrained without trust_remote_code=False")
    assert not hits, "\n".join(hits)
