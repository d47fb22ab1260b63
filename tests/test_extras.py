"""`pip install qgplm` leaves out what only some features need (pyproject.toml's extras gguf, onnx, hub).
A feature whose package is missing ends with one line naming the extra that installs it. Each package
is made missing by `sys.modules[name] = None`, which makes its import fail as if it were not installed."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from qgplm.cli.args import run_main
from qgplm.errors import EXTRAS, QgplmError, optional_module
from tests.test_export import student


def _export(tmp_path):
    from qgplm.export import export_model

    export_model(student("gpt2", 2), tmp_path / "e")
    return tmp_path / "e"


def _llama_cpp(tmp_path):
    from qgplm.export.runtimes.llamacpp import LlamaCppLM

    LlamaCppLM(tmp_path)


def _onnx(tmp_path):
    from qgplm.export.converters.onnx import export_onnx

    export_onnx(_export(tmp_path), tmp_path / "o")


def _onnxruntime(tmp_path):
    from qgplm.export import load_quantized

    load_quantized(_export(tmp_path), mode="lowbit")


def _datasets(tmp_path, monkeypatch):
    from qgplm.data import sources

    monkeypatch.setattr(sources, "hub_reachable", lambda: True)
    sources.load_texts(SimpleNamespace(name="wikitext2", data_dir=None, files=None, hub_path="wikitext",
                                       hub_name="wikitext-2-raw-v1"))


CASES = [("llama_cpp", "gguf", _llama_cpp), ("onnx", "onnx", _onnx), ("onnxruntime", "onnx", _onnxruntime),
         ("datasets", "hub", _datasets)]


@pytest.mark.parametrize("module, extra, feature", CASES, ids=[c[0] for c in CASES])
def test_a_missing_optional_package_names_its_extra(tmp_path, monkeypatch, capsys, module, extra, feature):
    monkeypatch.setitem(sys.modules, module, None)

    def main(argv):
        if module == "datasets":
            feature(tmp_path, monkeypatch)
        else:
            feature(tmp_path)
        return 0

    monkeypatch.setattr(sys, "argv", ["qgplm"])
    with pytest.raises(SystemExit) as e:
        run_main(main)  # what the commands do with a QgplmError
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and f"pip install 'qgplm[{extra}]'" in err, err


def test_every_optional_package_has_an_extra_of_pyproject():
    import tomllib

    from tests.conftest import ROOT

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for module, (package, extra) in EXTRAS.items():
        assert any(d.startswith(package) for d in extras[extra]) or any(d.startswith(package) for d in core), module
    for package in ("llama-cpp-python", "onnx", "onnxruntime", "datasets"):
        assert not any(d.split(">")[0].split("=")[0] == package for d in core), f"{package} is in the core"


def test_optional_module_returns_an_installed_module():
    assert optional_module("gguf", "format=gguf").__name__ == "gguf"
    with pytest.raises(QgplmError, match=r"^format=gguf needs the gguf package: pip install 'qgplm\[gguf\]', or x$"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(sys.modules, "gguf", None)
            optional_module("gguf", "format=gguf", "x")
