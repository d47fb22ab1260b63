"""Hydra callbacks: refuse an unusable run directory before Hydra writes anything into it.

Hydra creates the run dir and writes `.hydra/` and `run.log` before the task runs, so the
"never overwrite an earlier run" check of `qgplm.train.rundir.check_fresh_run_dir` must also run
here, at `on_run_start` / `on_multirun_start`, or an earlier run's `.hydra/config.yaml` would be
replaced before qgplm refuses the directory. Hydra turns exceptions raised in callbacks into
warnings and carries on, so the guard ends the process itself (one `error:` line, exit 2).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from qgplm.errors import QgplmError


def check_writable_dir(path: Path, key: str) -> None:
    """Create `path` if needed and prove a file can be written there (root ignores chmod, so test)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise QgplmError(f"cannot write to {key}={path} ({e.strerror}): choose a writable directory, "
                         f"e.g. {key}=/tmp/qgplm-run") from None


def check_fresh_dir(path: Path) -> None:
    from qgplm.train.rundir import check_fresh_run_dir

    if path.is_dir():
        check_fresh_run_dir(path)


class RunDirGuard(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from qgplm.train.distributed import is_launched_rank

        if is_launched_rank():  # a DDP rank started into rank 0's (already checked) run dir
            return
        try:
            out = Path(str(OmegaConf.select(config, "hydra.run.dir")))
            check_fresh_dir(out)
            check_writable_dir(out, "hydra.run.dir")
        except QgplmError as e:
            _exit(e)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._check_sweep_dir(config)
        except QgplmError as e:
            _exit(e)

    @staticmethod
    def _check_sweep_dir(config: DictConfig) -> None:
        sweep = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        if sweep.is_dir():
            for sub in sorted(p for p in sweep.iterdir() if p.is_dir()):
                try:
                    check_fresh_dir(sub)
                except QgplmError:
                    raise QgplmError(f"hydra.sweep.dir={sweep} already holds runs ({sub.name}/): choose a new "
                                     f"hydra.sweep.dir (or leave it unset for a fresh timestamped one)") from None
        check_writable_dir(sweep, "hydra.sweep.dir")


def _exit(e: QgplmError) -> None:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
