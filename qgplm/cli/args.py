"""`key=value` argument parsing shared by `python -m qgplm.export` and `python -m qgplm.generate`
(the same spelling as the Hydra overrides of `qgplm.run`, without composing a Hydra config)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from qgplm.errors import QgplmError


def _bool(v: str) -> bool:
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise ValueError(v)


def _opt_int(v: str) -> int | None:
    return None if v.lower() in ("null", "none", "fp") else int(v)


CONVERTERS: dict[type | str, Callable[[str], Any]] = {str: str, int: int, float: float, bool: _bool,
                                                        "opt_int": _opt_int}


def parse_kv(argv: list[str], spec: dict[str, tuple[Any, Any]], usage: str) -> dict[str, Any]:
    """spec: {key: (type or 'opt_int', default)}; a default of ... marks a required key."""
    out = {k: d for k, (_, d) in spec.items()}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise QgplmError(f"argument {arg!r} is not key=value: usage: {usage}")
        if key not in spec:
            raise QgplmError(f"unknown argument {key!r}: allowed keys are {', '.join(spec)} (usage: {usage})")
        kind = spec[key][0]
        try:
            out[key] = CONVERTERS[kind](value)
        except ValueError:
            raise QgplmError(f"{key}={value!r} is not a valid {getattr(kind, '__name__', 'integer or null')}") from None
    missing = [k for k, v in out.items() if v is ...]
    if missing:
        raise QgplmError(f"missing {missing[0]}=...: usage: {usage}")
    return out


def run_main(main: Callable[[list[str]], int]) -> None:
    """Run `main(argv)`; a QgplmError becomes one `error: ...` line and exit code 2 (as qgplm.run)."""
    try:
        code = main(sys.argv[1:])
    except QgplmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)
