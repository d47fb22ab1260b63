"""No file a user passes runs code (docs/security.md).

For each kind of file qgplm reads (checkpoints, teacher dirs, exports, GGUF, ONNX, tokenizer
dirs, run configs), a copy whose loading would run a payload is passed to the real command line:
the payload's marker file is never created, and the command ends in one `error:` line with exit
code 2. The payloads are built here with pickle (the attack), never loaded by qgplm.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from qgplm.errors import QgplmError
from qgplm.resume import read_identity
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
    """`qgplm.run` in-process on a composed config: exit 2 with one error line."""
    from qgplm.run import execute

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
    from qgplm.export.__main__ import main

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
    ("+callbacks.f._target_=qgplm.resume.read_identity",
     "callbacks.f._target_=qgplm.resume.read_identity is not an importable class"),
])
def test_a_target_outside_the_allowlist_is_refused(tiny_cfg, tmp_path, capsys, override, expected):
    err = run_error(tiny_cfg("stage=teacher", override), capsys)
    assert expected in err
    assert not (tmp_path / "teacher").exists()


def test_allowlist_extended_from_the_environment(monkeypatch):
    from omegaconf import OmegaConf

    from qgplm.targets import check_targets

    cfg = OmegaConf.create({"mine": {"_target_": "collections.OrderedDict"}})
    with pytest.raises(QgplmError, match="is not an allowed class"):
        check_targets(cfg, "callbacks")
    monkeypatch.setenv("QGPLM_ALLOW_TARGETS", "collections.")
    check_targets(cfg, "callbacks")
    for section in ("trainer", "callbacks", "logger"):  # every shipped config passes
        for f in (ROOT / "conf" / section).glob("*.yaml"):
            check_targets(OmegaConf.load(f), section)
