"""Distributed runs (DDP, multi-node) with Hydra: who writes, and how ranks are started.

Lightning's `ddp` strategy starts ranks 1..N-1 by running the entry point again. Under Hydra it
re-runs `sys.argv` with `hydra.run.dir` set to the *run* dir pattern: inside a multirun
(`-m method=a,b`) each child would start the whole sweep again, or write into another job's
directory (Lightning issue #11300 and friends). `install_hydra_ddp_fix` replaces that command
with one that starts *this job* only: `python -m qgplm.run <this job's overrides>
hydra.run.dir=<this job's output dir> hydra.output_subdir=null`, without `-m`.

In a multirun the jobs run one after the other in one process: `distributed_job` tears down
the process group and the launcher's environment after each job, or the next job would believe
its ranks already exist and wait for peers that have exited.

Every rank runs the whole pipeline (that is how script-launched DDP works: the teacher stage,
then the student stage, in lock-step); only global rank 0 writes result files (metrics.json,
the saved teacher, the summary), and only it checks that the run directory is fresh.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

# what Lightning's launcher puts in the environment of the process that starts the ranks
LAUNCH_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED")


def global_rank() -> int:
    """This process' global rank: Lightning sets it on import from the launcher's environment
    (RANK, LOCAL_RANK, SLURM_PROCID, ...) and again when a strategy sets up (0 when not distributed)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(rank_zero_only.rank)


def is_launched_rank() -> bool:
    """True in a process started by a launcher for rank > 0 (it must not re-check or re-create
    the run directory rank 0 is writing)."""
    return global_rank() != 0 or os.environ.get("LOCAL_RANK", "0") != "0"


def hydra_job_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command that starts rank `local_rank` of the current Hydra job (single run or one job
    of a multirun) and the directory to start it in."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hc = HydraConfig.get()
    overrides = [o for o in hc.overrides.task if not o.startswith("hydra.")]
    command = [sys.executable, "-m", "qgplm.run", *overrides,
               f"hydra.run.dir={hc.runtime.output_dir}", "hydra.output_subdir=null",
               f"hydra.job.name={hc.job.name}_rank{local_rank}"]
    return command, get_original_cwd()


def install_hydra_ddp_fix() -> None:
    """Make Lightning's subprocess launcher start ranks with `hydra_job_command`."""
    from lightning.pytorch.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = hydra_job_command


@contextlib.contextmanager
def distributed_job() -> Iterator[None]:
    """One Hydra job's distributed state: destroyed, and the environment restored, at its end."""
    before = {k: os.environ.get(k) for k in LAUNCH_ENV}
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def gather_valid_rows(strategy: Any, mask: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Every rank's rows where `mask` is set, concatenated in rank order: the same on every rank.

    `mask` ([B, T], say) and each tensor ([B, T, ...]) share their leading dims, whose sizes may
    differ between ranks (a batch padded to its own longest example: XSum, Persona-Chat), and
    all_gather needs one shape everywhere. So the ranks first gather their counts of selected rows,
    then their selected rows padded to the largest count, and drop the padding. `strategy`: a
    Lightning strategy (its `all_gather` stacks the ranks' tensors on a new first dim).
    """
    import torch

    keep = mask.reshape(-1).bool()
    rows = [t.reshape(keep.numel(), *t.shape[mask.dim():])[keep] for t in tensors]
    counts = strategy.all_gather(keep.sum().reshape(1)).reshape(-1)  # [world]
    most = int(counts.max())
    padded = [torch.cat([r, r.new_zeros(most - r.shape[0], *r.shape[1:])]) for r in rows]
    valid = torch.arange(most, device=counts.device).unsqueeze(0) < counts.unsqueeze(1)  # [world, most]
    return tuple(strategy.all_gather(p)[valid.to(p.device)] for p in padded)
