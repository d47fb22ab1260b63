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

# package -> what it must not load, even indirectly
BELOW = {
    "qgplm.quant": ("qgplm.callbacks", "qgplm.tasks", "qgplm.pipeline", "qgplm.module", "qgplm.export"),
    "qgplm.data": ("qgplm.tasks", "qgplm.pipeline", "qgplm.module", "qgplm.config", "qgplm.evaluation"),
    "qgplm.distill": ("qgplm.quant", "qgplm.tasks", "qgplm.pipeline", "qgplm.module"),
    "qgplm.evaluation": ("qgplm.tasks", "qgplm.pipeline", "qgplm.module"),
    "qgplm.tasks": ("qgplm.pipeline", "qgplm.module", "qgplm.export", "qgplm.callbacks"),
    "qgplm.export": ("qgplm.pipeline", "qgplm.run"),
}


@pytest.mark.parametrize("package", sorted(BELOW))
def test_a_layer_does_not_import_the_layers_above(package):
    mods = [f"{package}.{m.stem}" for m in (ROOT / package.replace(".", "/")).glob("*.py") if m.stem != "__main__"]
    mods = mods or [package]
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
