"""Range checks of config values, each failing with one line that names the key and the fix.

Shared by the run config (qgplm.train.config) and the task configs (qgplm.tasks), which must not import
each other's modules at import time.
"""

from __future__ import annotations

import math
from typing import Any

from qgplm.errors import QgplmError


def choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise QgplmError(f"{key}={value!r} is not valid: choose one of {', '.join(map(str, allowed))}")


def positive(key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
        raise QgplmError(f"{key} must be a positive number, got {value!r}: set {key} to a number > 0")


def at_least(key: str, value: Any, low: float) -> None:
    """A finite number >= low (ints stay ints: the dataclass types already checked them)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value < float("inf"):
        raise QgplmError(f"{key} must be >= {low}, got {value!r}: set {key} to a number >= {low}")


def finite(key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise QgplmError(f"{key} must be a finite number, got {value!r}: set {key}=<number>")


def count_or_none(key: str, value: int | None) -> None:
    """A count that may be left unset (null: no limit / the default)."""
    if value is not None and value < 1:
        raise QgplmError(f"{key} must be >= 1 or null, got {value}")
