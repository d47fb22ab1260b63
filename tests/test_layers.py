"""The layering docs/architecture.md's Layout section describes: lower packages never import the ones above
them, and the data layer's structural types match the task configs that are passed to it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from qgplm.data import settings
from qgplm.tasks.lm import LMTaskConfig
from qgplm.tasks.persona_chat import PersonaChatTaskConfig
from qgplm.tasks.summarization import SummarizationTaskConfig
from tests.conftest import ROOT

# package -> what it must not load, even indirectly (the library's own check, no Lightning/Hydra, is test_layout.py)
BELOW = {
    "qgplm.distill": ("qgplm.quant", "qgplm.tasks", "qgplm.train", "qgplm.cli"),
    "qgplm.quant": ("qgplm.export", "qgplm.data", "qgplm.tasks", "qgplm.train", "qgplm.cli"),
    "qgplm.models": ("qgplm.quant", "qgplm.export", "qgplm.data", "qgplm.tasks", "qgplm.train", "qgplm.cli"),
    "qgplm.export": ("qgplm.data", "qgplm.tasks", "qgplm.train", "qgplm.cli", "qgplm.run"),
    "qgplm.data": ("qgplm.tasks", "qgplm.train", "qgplm.cli"),
    "qgplm.tasks": ("qgplm.export", "qgplm.train", "qgplm.cli"),
    "qgplm.train": ("qgplm.cli", "qgplm.run", "qgplm.generate"),
}


def _modules(package: str) -> list[str]:
    """The package and each of its modules, subpackages included (entry-point `__main__` files left out)."""
    base = ROOT / package.replace(".", "/")
    mods = []
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("").parts
        if rel[-1] != "__main__":
            mods.append(".".join(rel[:-1] if rel[-1] == "__init__" else rel))
    return mods


@pytest.mark.parametrize("package", sorted(BELOW))
def test_a_layer_does_not_import_the_layers_above(package):
    mods = _modules(package)
    code = (f"import importlib, sys\nfor m in {mods!r}: importlib.import_module(m)\n"
            f"print(sorted(n for n in sys.modules if n.startswith({BELOW[package]!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", f"{package} loads {proc.stdout.strip()}"


@pytest.mark.parametrize("config, protocol", [(LMTaskConfig, settings.LMSettings),
                                              (PersonaChatTaskConfig, settings.PersonaChatSettings),
                                              (SummarizationTaskConfig, settings.SummarizationSettings)])
def test_task_configs_have_what_the_data_layer_reads(config, protocol):
    fields = {f.name for f in dataclasses.fields(config)}
    needed = set().union(*(getattr(k, "__annotations__", {}) for k in protocol.__mro__))
    assert needed and needed <= fields, sorted(needed - fields)
