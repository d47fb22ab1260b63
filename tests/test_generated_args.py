"""Generated arguments for the three command lines (hypothesis): wrong types, out-of-range numbers,
empty, huge and unicode strings, missing and extra keys. Every input ends with exit code 0 or 2
(one `error:` line), never a traceback, and nothing already written changes.

export and generate run their real main functions in-process (as `python -m` would, through
run_main); for `qgplm.run` the generated values are set into the composed config and validated by
RunConfig.from_hydra plus the `_target_` allowlist, the checks `qgplm.run` makes before any work.
`make test` tries a few cases per CLI; the slow variants many more.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from qgplm.errors import QgplmError
from qgplm.export import export_model
from qgplm.models import load_tokenizer
from tests.conftest import SHARED_DATA, compose_cfg

FAST, SLOW = 15, 200

numbers = st.one_of(st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True))
strings = st.one_of(st.text(max_size=30), st.text(min_size=2000, max_size=5000),
                    st.sampled_from(["", " ", "null", "None", "true", "-1", "0", "1e309", "nan", "inf", "٣", "\x00",
                                     "../../etc", "é" * 300, "🙂"]))
values = st.one_of(numbers.map(str), strings)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny GPT-2 export (32 positions), an existing file and dir; the cwd is an empty scratch dir
    so that relative out= values land nowhere that matters."""
    tmp = tmp_path_factory.mktemp("gen")
    tok = load_tokenizer(str(SHARED_DATA / "gpt2-tokenizer"))
    export_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32,
                                            vocab_size=len(tok))), tmp / "kept" / "export", tok)
    (tmp / "kept" / "a_file").write_text("earlier\n")
    (tmp / "scratch").mkdir()
    old = os.getcwd()
    os.chdir(tmp / "scratch")
    yield tmp
    os.chdir(old)


def _argv(draw, spec: dict, paths: dict[str, list[str]]) -> list[str]:
    keys = draw(st.lists(st.sampled_from([*spec, "extra", "bits", ""]), max_size=len(spec) + 2))
    argv = []
    for k in keys:
        v = draw(st.one_of(st.sampled_from(paths[k]), values) if k in paths else values)
        argv.append(f"{k}={v}")
    if draw(st.booleans()):
        argv.append(draw(strings))  # not key=value (or an odd one)
    return argv


def _check_cli(main, argv: list[str], root: Path, capsys) -> None:
    from qgplm.cli.args import run_main

    before = _digest(root / "kept")
    old = sys.argv
    sys.argv = ["qgplm", *argv]
    try:
        with pytest.raises(SystemExit) as e:  # anything but QgplmError propagates: a failure here
            run_main(main)
    finally:
        sys.argv = old
    err = capsys.readouterr().err
    assert e.value.code in (0, 2), (argv, err)
    if e.value.code == 2:
        assert err.count("error: ") == 1 and "Traceback" not in err, (argv, err)
    assert _digest(root / "kept") == before, argv


def _generate_case(world, capsys, data):
    from qgplm.cli.generate import SPEC, main

    kept = world / "kept"
    paths = {"dir": [str(kept / "export"), str(kept / "a_file"), str(world / "nowhere")],
             "mode": ["dequantize", "int8", "gguf", "lowbit"]}
    _check_cli(main, _argv(data.draw, SPEC, paths), world, capsys)


def _export_case(world, capsys, data):
    from qgplm.cli.export import SPEC, main

    kept = world / "kept"
    paths = {"ckpt": [str(kept), str(kept / "export"), str(world / "nowhere")],
             "model": [str(kept / "export"), str(world / "nowhere")],
             "out": [str(kept / "a_file"), str(kept), str(kept / "a_file" / "x")],
             "format": ["qgplm", "onnx", "gguf"]}
    _check_cli(main, _argv(data.draw, SPEC, paths), world, capsys)


RUN_KEYS = ["seed", "generate_samples", "task.block_size", "task.batch_size", "task.num_workers",
            "task.max_train_tokens", "bits.weight", "bits.embedding", "bits.activation", "student.optim.lr",
            "teacher.optim.weight_decay", "student.max_steps", "method.distill.layer", "method.distill.tau",
            "trainer.accumulate_grad_batches", "trainer.precision", "trainer._target_", "stage", "ckpt_path",
            "teacher_path", "callbacks.model_checkpoint._target_"]


def _run_case(world, data):
    from qgplm.train.config import RunConfig
    from qgplm.train.targets import check_targets

    cfg = compose_cfg([], world / "scratch" / "run")
    for key in data.draw(st.lists(st.sampled_from(RUN_KEYS), min_size=1, max_size=4)):
        value = data.draw(st.one_of(numbers, strings, st.none(), st.booleans(), st.lists(st.integers(), max_size=3)))
        OmegaConf.update(cfg, key, value, force_add=True)
    try:
        RunConfig.from_hydra(cfg)
        for section in ("trainer", "callbacks", "logger"):
            check_targets(cfg.get(section), section)
    except QgplmError as e:
        assert "\n" not in str(e)


def _cases(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_cases(FAST)
@given(data=st.data())
def test_generate_generated_args(world, capsys, data):
    _generate_case(world, capsys, data)


@_cases(FAST)
@given(data=st.data())
def test_export_generated_args(world, capsys, data):
    _export_case(world, capsys, data)


@_cases(FAST)
@given(data=st.data())
def test_run_generated_config_values(world, data):
    _run_case(world, data)


@pytest.mark.slow
@_cases(SLOW)
@given(data=st.data())
def test_generate_generated_args_many(world, capsys, data):
    _generate_case(world, capsys, data)


@pytest.mark.slow
@_cases(SLOW)
@given(data=st.data())
def test_export_generated_args_many(world, capsys, data):
    _export_case(world, capsys, data)


@pytest.mark.slow
@_cases(SLOW)
@given(data=st.data())
def test_run_generated_config_values_many(world, data):
    _run_case(world, data)
