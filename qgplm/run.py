"""Hydra entry point: `python -m qgplm.run [group=option ...] [key=value ...]`.

Validates the composed config once (qgplm.config.RunConfig), runs the stages, prints the summary
and returns the student's test PPL (the value Hydra sweepers optimise). User errors end with
one line on stderr and exit code 2.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from qgplm.errors import QgplmError

# absolute, so that the entry point works however it is started (`python -m qgplm.run`, the
# `qgplm-run` console script, or an import): Hydra resolves a relative config_path against the
# calling module, which for a console script is not qgplm/run.py
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

_INT_GROUP = re.compile(r"^(~?\+{0,2}bits)=([\w,]+)$")


def quote_int_group_overrides(argv: list[str]) -> list[str]:
    """`bits=2` -> `bits='2'` (also `bits=2,4,fp` for multirun: numbers quoted, names kept).

    Hydra parses `bits=2` as an int and refuses it as a config-group choice; the group's options
    are the files conf/bits/2.yaml, 4.yaml, ... so we quote the numbers before Hydra sees them.
    """
    out = []
    for arg in argv:
        m = _INT_GROUP.match(arg)
        if m:
            arg = f"{m.group(1)}=" + ",".join(f"'{v}'" if v.isdigit() else v for v in m.group(2).split(","))
        out.append(arg)
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="run")
def main(cfg: DictConfig) -> float | None:
    from qgplm.config import RunConfig
    from qgplm.pipeline import run_stages
    from qgplm.summary import print_summary

    try:
        run = RunConfig.from_hydra(cfg)
        metrics = run_stages(run, cfg.trainer, cfg.get("logger"), cfg.get("callbacks"))
    except QgplmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print_summary(metrics, run.output_dir)
    return metrics.get("student", metrics["teacher"])["test_ppl"]


def cli() -> None:
    sys.argv = [sys.argv[0], *quote_int_group_overrides(sys.argv[1:])]
    main()


if __name__ == "__main__":
    cli()
