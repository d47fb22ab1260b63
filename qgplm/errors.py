"""One exception type for every user-facing failure.

`qgplm.run` catches it and prints its message as a single line, so each raise site must word
the message as "what is wrong: how to fix it".
"""

from __future__ import annotations

import importlib
from types import ModuleType


class QgplmError(Exception):
    """A failure caused by the user's input (config, files, environment), not a bug."""


# module -> (the package pip installs, the qgplm extra that brings it; pyproject.toml declares them).
# `pip install qgplm` leaves these out so that training installs light; gguf is in the core (the
# SmolLM2 teacher loads through it) and is listed for the message of an install that lost it.
EXTRAS: dict[str, tuple[str, str]] = {
    "llama_cpp": ("llama-cpp-python", "gguf"),
    "gguf": ("gguf", "gguf"),
    "onnx": ("onnx", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),
    "datasets": ("datasets", "hub"),
}


def optional_module(name: str, needed_for: str, instead: str = "") -> ModuleType:
    """Import a package that only some features need (one of EXTRAS). When it is missing: a QgplmError
    of one line naming what needs it, the extra that installs it, and `instead`, another way."""
    try:
        return importlib.import_module(name)
    except ImportError:
        package, extra = EXTRAS[name]
        other = f", or {instead}" if instead else ""
        raise QgplmError(f"{needed_for} needs the {package} package: pip install 'qgplm[{extra}]'{other}") from None
