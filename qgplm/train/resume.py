"""Resuming an interrupted run from its Lightning checkpoint (`ckpt_path=`).

A checkpoint holds everything the stage needs to continue exactly: the model (student weights,
every quantizer parameter and buffer, with `initialized` set so nothing is re-calibrated), the
optimizer and LR-scheduler state, the loop counters (from which the training loader finds its
position, see qgplm/data/sampling.py), callback state (memory bank, RNG states, best-checkpoint
tracking) and `checkpoint["qgplm"]`, the run's identity, checked here against the new config
so that a checkpoint of another method, bit-width, model or task is refused.

The resumed run continues in the interrupted run's directory (that is where its checkpoints,
teacher and logs are); the new Hydra directory only gets the log of the resume.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgplm.errors import QgplmError
from qgplm.safeload import load_torch_file
from qgplm.train.config import RunConfig

# what must match between the checkpoint and the resumed run
IDENTITY_KEYS = ("model", "task", "method", "quantizer", "bits", "seed")


def run_identity(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """Stored in every checkpoint as checkpoint["qgplm"]."""
    return {"stage": stage, "model": cfg.model.name, "task": cfg.task.name, "method": cfg.method.name,
            "quantizer": cfg.method.quantizer, "bits": cfg.quant.tag, "seed": cfg.seed,
            "bit_widths": dataclasses.asdict(cfg.bits)}


def _as_overrides(ident: dict[str, Any], keys: list[str]) -> str:
    """The command-line settings that reproduce `ident` for the differing `keys`."""
    out = []
    for k in keys:
        if k == "bits" and isinstance(ident.get("bit_widths"), dict):
            out += [f"bits.{b}={'null' if v is None else v}" for b, v in ident["bit_widths"].items()]
        elif k == "quantizer":
            out.append(f"method.quantizer={ident.get(k)}")
        else:
            out.append(f"{k}={ident.get(k)}")
    return " ".join(out)


@dataclass
class ResumePoint:
    ckpt: Path       # the Lightning checkpoint to continue from
    stage: str       # "teacher" or "student"
    run_dir: Path    # the interrupted run's directory, where the run continues


def _pick_checkpoint(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for stage in ("student", "teacher"):
            last = path / "checkpoints" / stage / "last.ckpt"
            if last.is_file():
                return last
        raise QgplmError(f"ckpt_path={path} holds no checkpoints/student/last.ckpt or checkpoints/teacher/last.ckpt: "
                         f"pass the run dir of an interrupted run or a .ckpt file")
    raise QgplmError(f"ckpt_path={path} does not exist: pass the run dir of an interrupted run or its last.ckpt")


def read_identity(ckpt: Path) -> dict[str, Any]:
    """checkpoint["qgplm"], read with weights_only=True (qgplm.safeload): a checkpoint carrying
    code is refused before anything in it runs."""
    state = load_torch_file(ckpt, f"checkpoint {ckpt}", "resume from another checkpoint (e.g. best.ckpt) of a "
                            "qgplm run dir, or start a new run", mmap=True)
    ident = state.get("qgplm") if isinstance(state, dict) else None
    if not isinstance(ident, dict) or "stage" not in ident:
        raise QgplmError(f"checkpoint {ckpt} was not written by a qgplm run: pass the last.ckpt of a qgplm run dir")
    return ident


def resume_point(cfg: RunConfig) -> ResumePoint | None:
    """Where to resume from (None without ckpt_path); refuses a checkpoint of another run."""
    if not cfg.ckpt_path:
        return None
    ckpt = _pick_checkpoint(Path(cfg.ckpt_path).expanduser())
    ident = read_identity(ckpt)
    stage = ident["stage"]
    expected = run_identity(cfg, stage)
    diff = [k for k in IDENTITY_KEYS if ident.get(k) != expected[k]]
    if diff:
        was = " ".join(f"{k}={ident.get(k)}" for k in diff)
        now = " ".join(f"{k}={expected[k]}" for k in diff)
        fix = _as_overrides(ident, [k for k in diff if not (k == "quantizer" and "method" in diff)])
        raise QgplmError(f"checkpoint {ckpt} is from a run with {was}, this run has {now}: "
                         f"resume with {fix}, or start a new run without ckpt_path")
    allowed = {"teacher": ("teacher", "pipeline"), "student": ("quantize", "pipeline")}[stage]
    if cfg.stage not in allowed:
        raise QgplmError(f"checkpoint {ckpt} is of the {stage} stage, which stage={cfg.stage} does not run: "
                         f"use stage={' or stage='.join(allowed)}")
    resolved = ckpt.resolve()
    if resolved.parent.name == stage and resolved.parent.parent.name == "checkpoints":
        run_dir = resolved.parents[2]  # <run dir>/checkpoints/<stage>/last.ckpt: continue there
    else:
        run_dir = Path(cfg.output_dir)  # a checkpoint moved elsewhere: continue in the new run dir
    if (run_dir / "metrics.json").exists():
        raise QgplmError(f"run {run_dir} already finished (metrics.json exists): nothing to resume")
    return ResumePoint(ckpt=ckpt, stage=stage, run_dir=run_dir)
