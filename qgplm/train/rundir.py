"""Where a run's results are, and the check that a new run never writes over an earlier one's.

Its own module because both the pipeline (writing runs) and qgplm.export / the Hydra callbacks
(reading or guarding them) need these paths, and those must not import the pipeline.
"""

from __future__ import annotations

from pathlib import Path

from qgplm.errors import QgplmError

RESULT_ENTRIES = ("metrics.json", "checkpoints", "teacher")  # what makes a dir an earlier run's
TEACHER_METRICS = "teacher_metrics.json"  # the teacher's figures, so a resumed student stage reports them


def teacher_dir(path: str) -> Path:
    """A saved HF model dir, or a run dir holding one under teacher/."""
    p = Path(path).expanduser()
    if (p / "teacher" / "config.json").is_file():
        return p / "teacher"
    if not p.exists():
        raise QgplmError(f"teacher_path={path} does not exist: pass a run dir of stage=teacher or a saved model dir")
    if p.is_file():
        raise QgplmError(f"teacher_path={path} is a file: pass the run dir of a stage=teacher or pipeline run "
                         f"(or its teacher/ folder)")
    if not (p / "config.json").is_file() and ((p / "metrics.json").is_file() or (p / "checkpoints").is_dir()):
        raise QgplmError(f"teacher_path={path} is a run dir without a saved teacher/ (a stage=quantize run?): pass "
                         f"the run dir of the stage=teacher or pipeline run that trained the teacher")
    return p


def check_fresh_run_dir(out: Path) -> None:
    """Never write over an earlier run's results."""
    taken = [name for name in RESULT_ENTRIES if (out / name).exists()]
    if taken:
        raise QgplmError(f"run dir {out} already holds a run ({', '.join(taken)}): choose a new hydra.run.dir "
                         f"(or leave it unset for a fresh timestamped one)")
