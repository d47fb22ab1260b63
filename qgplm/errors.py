"""One exception type for every user-facing failure.

`qgplm.run` catches it and prints its message as a single line, so each raise site must word
the message as "what is wrong: how to fix it".
"""

from __future__ import annotations

import importlib
from types import ModuleType


class QgplmError(Exception):
    """A failure caused by the user's input (config, files, environment), not a bug."""


def optional_module(name: str, fix: str) -> ModuleType:
    """Import a runtime that only some features need (onnx, onnxruntime, gguf, llama_cpp); when it
    is missing, a QgplmError whose message is `fix` (what to install, or which mode to use instead)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise QgplmError(fix) from None
