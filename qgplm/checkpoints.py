"""What a qgplm Lightning checkpoint was trained as, and the checks before resuming from one.

Every checkpoint a qgplm module saves carries `checkpoint["qgplm"]`: the stage (teacher or
student), the method, its quantizer and the bit-widths. `check_resumable` reads a `ckpt_path=`
before Lightning does, so a truncated file or a checkpoint of another method / bit-width ends in
one line naming both, instead of a traceback or a silently mismatched student.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qgplm.errors import QgplmError

INFO_KEY = "qgplm"


def student_info(method: str, quantizer: str, bits: dict[str, int | None], tag: str) -> dict[str, Any]:
    return {"stage": "student", "method": method, "quantizer": quantizer, "bits": dict(bits), "bits_tag": tag}


def read_checkpoint(path: str, key: str = "ckpt_path") -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise QgplmError(f"{key}={path} is not a file: pass a .ckpt of an earlier run "
                         f"(<run dir>/checkpoints/student/last.ckpt)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip (RuntimeError), EOFError, UnpicklingError, ...
        first = str(e).splitlines()[0].split(". ")[0] if str(e) else ""
        raise QgplmError(f"{key}={path} is truncated or not a checkpoint ({type(e).__name__}: {first}): pass an "
                         f"intact one, e.g. the run's checkpoints/student/best.ckpt") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise QgplmError(f"{key}={path} is not a Lightning checkpoint: pass <run dir>/checkpoints/student/last.ckpt")
    return ckpt


def _bits_overrides(bits: dict[str, int | None]) -> str:
    return " ".join(f"bits.{k}={'null' if v is None else v}" for k, v in bits.items())


def check_resumable(path: str, expected: dict[str, Any], key: str = "ckpt_path") -> None:
    """Refuse a checkpoint that is truncated, not a student's, or of another method / bit-width."""
    info = read_checkpoint(path, key).get(INFO_KEY)
    if not isinstance(info, dict):
        raise QgplmError(f"{key}={path} was not written by a qgplm student (no '{INFO_KEY}' entry): pass "
                         f"<run dir>/checkpoints/student/last.ckpt of a stage=quantize or pipeline run")
    if info.get("stage") != "student":
        raise QgplmError(f"{key}={path} is a {info.get('stage')} checkpoint: pass the student's, "
                         f"<run dir>/checkpoints/student/last.ckpt (a teacher is given with teacher_path=<run dir>)")
    mismatch = [k for k in ("method", "quantizer", "bits") if info.get(k) != expected.get(k)]
    if mismatch:
        raise QgplmError(
            f"{key}={path} was trained with method={info.get('method')} {info.get('bits_tag')} but this run is "
            f"method={expected['method']} {expected['bits_tag']}: resume with method={info.get('method')} "
            f"{_bits_overrides(info.get('bits', {}))}, or drop ckpt_path to start a new student")
