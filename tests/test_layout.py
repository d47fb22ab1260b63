"""The library (`qgplm.quant`, `distill`, `models`, `export`) stands without the training application:
none of its modules imports Lightning, Hydra or OmegaConf, neither in its own source (read statically,
every import statement, lazy ones inside functions included) nor through what it imports (each module
imported alone in a fresh interpreter)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("quant", "distill", "models", "export")
APPLICATION = ("lightning", "pytorch_lightning", "hydra", "omegaconf")
# What the library may not import from qgplm itself: the training application and the entry points.
APPLICATION_PACKAGES = ("qgplm.train", "qgplm.cli", "qgplm.run", "qgplm.generate", "qgplm.tasks", "qgplm.data")


def library_modules() -> list[str]:
    names = []
    for part in LIBRARY:
        for path in sorted((ROOT / "qgplm" / part).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            names.append(".".join(parts))
    return names


def module_path(name: str) -> Path:
    base = ROOT.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def imported_names(path: Path, package: str) -> list[str]:
    """Every module an import statement of `path` names, relative imports resolved from `package`."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            else:
                names.append(node.module or "")
    return names


def _is_under(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def test_the_library_has_modules():
    mods = library_modules()
    assert "qgplm.quant" in mods and "qgplm.export" in mods and len(mods) > 20


@pytest.mark.parametrize("name", library_modules())
def test_library_source_imports_no_application(name):
    package = name if module_path(name).name == "__init__.py" else name.rpartition(".")[0]
    bad = [m for m in imported_names(module_path(name), package) if _is_under(m, APPLICATION + APPLICATION_PACKAGES)]
    assert not bad, f"{name} imports {bad}"


_PROBE = (
    "import importlib, sys\n"
    "for name in sys.argv[1:]:\n"
    "    importlib.import_module(name)\n"
    f"print(sorted(m for m in sys.modules if m.split('.')[0] in {APPLICATION!r}))\n"
)


def _application_modules_after_import(names: list[str]) -> str:
    """The application modules in sys.modules of a fresh interpreter after importing `names`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _PROBE, *names], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_fresh_import_pulls_in_no_application():
    """Every library module imported in a fresh interpreter leaves Lightning, Hydra and OmegaConf out of
    sys.modules. One interpreter imports them all first: what a module pulls in alone it pulls in
    beside the others too, so a clean result holds for each. Only when it is not clean is each module
    imported alone, in its own interpreter, to name the ones at fault."""
    names = library_modules()
    if _application_modules_after_import(names) == "[]":
        return
    bad = {name: found for name in names if (found := _application_modules_after_import([name])) != "[]"}
    assert not bad, f"library modules that pull in the application: {bad}"


def test_static_check_catches_a_lazy_application_import(tmp_path):
    """The static check reads imports inside functions too (a lazy `from omegaconf import ...`)."""
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from omegaconf import OmegaConf\n    return OmegaConf\n")
    assert [m for m in imported_names(path, "qgplm.export") if _is_under(m, APPLICATION)] == ["omegaconf"]
