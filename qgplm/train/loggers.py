"""Experiment loggers for a stage, from the Hydra `logger/` group.

W&B specifics handled here, once:
- offline automatically when there is no API key or the W&B server is unreachable (the run is
  written under `<run dir>/wandb/offline-run-*`; `wandb sync <that dir>` uploads it later);
- one W&B run per stage (`<run dir name>-<stage>`, job_type = stage), all runs of a Hydra
  multirun in one group (the sweep directory's name) unless `logger.wandb.group` is set;
- the resolved, validated run config logged as hyperparameters.
"""

from __future__ import annotations

import functools
import logging
import netrc
import os
import socket
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from qgplm.train.targets import check_targets

log = logging.getLogger("qgplm")


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_HOST", "api.wandb.ai"))
    except (OSError, netrc.NetrcParseError):
        return False
    return auth is not None


@functools.lru_cache(maxsize=1)
def wandb_online(timeout: float = 2.0) -> bool:
    """An API key and a reachable server (WANDB_MODE=offline/disabled forces offline)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return False
    if not _has_wandb_key():
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host.split(":")[0], 443), timeout=timeout):
            return True
    except OSError:
        return False


def sweep_group() -> str | None:
    """The sweep directory's name inside a Hydra multirun, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not under @hydra.main (tests, the Python API)
        return None
    return Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None


def build_loggers(logger_cfg: DictConfig | None, run_dir: Path, stage: str, default_group: str,
                  hparams: dict[str, Any]) -> list[Logger]:
    loggers: list[Logger] = []
    for name, lg_cfg in (logger_cfg or OmegaConf.create()).items():
        check_targets(lg_cfg, f"logger.{name}")
        target = str(lg_cfg.get("_target_", ""))
        if target.endswith("CSVLogger"):
            lg = instantiate(lg_cfg, version=stage, save_dir=str(run_dir))
        elif target.endswith("WandbLogger"):
            offline = bool(lg_cfg.get("offline", False)) or not wandb_online()
            if offline and not lg_cfg.get("offline", False):
                log.info("W&B: no API key or no network, logging offline to %s/wandb (upload later with "
                         "`wandb sync %s/wandb/offline-run-*`)", run_dir, run_dir)
            group = lg_cfg.get("group") or sweep_group() or default_group
            lg = instantiate(lg_cfg, name=f"{run_dir.name}-{stage}", job_type=stage, group=group, offline=offline,
                             save_dir=str(run_dir))
        else:
            lg = instantiate(lg_cfg)
        lg.log_hyperparams(hparams)
        loggers.append(lg)
    return loggers


def wandb_runs(loggers: list[Logger]) -> list[Any]:
    """The live wandb runs among `loggers` (for media: histograms, tables)."""
    return [lg.experiment for lg in loggers if type(lg).__name__ == "WandbLogger"]


def finish_loggers(loggers: list[Logger]) -> None:
    for run in wandb_runs(loggers):
        run.finish()
