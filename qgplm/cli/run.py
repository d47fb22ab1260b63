"""Hydra entry point: `python -m qgplm.run [group=option ...] [key=value ...]`.

Validates the composed config once (qgplm.train.config.RunConfig), runs the stages, prints the summary
and returns the student's best validation PPL (the value Hydra sweepers optimise). User errors end with
one line on stderr (`error: <what is wrong>: <how to fix it>`) and exit code 2: qgplm's own
QgplmError, Hydra's composition errors (unknown group option or key, unparsable override) and
failed writes (read-only or full disk). In a multirun (`-m`) a failed job does not end the sweep:
its reason is printed at once (`error: job #N (<overrides>) failed: ...`) and kept in its run dir
(`error.txt`, with the traceback), the other jobs run, and the sweep exits 2 naming the failed jobs.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import traceback
from pathlib import Path
from typing import NoReturn

import hydra
from omegaconf import DictConfig

from qgplm.errors import QgplmError

# absolute, so that the entry point works however it is started (`python -m qgplm.run`, the
# `qgplm-run` console script, or an import): Hydra resolves a relative config_path against the
# calling module, which for a console script is not this file
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

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


def config_groups() -> dict[str, list[str]]:
    """Each config group of conf/ and its options (the .yaml files in its folder)."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in Path(CONF_DIR).iterdir() if d.is_dir()}


def check_group_overrides(argv: list[str]) -> None:
    """A config-group override (`model=...`, `bits=...`, `hydra/launcher=...`) must name options:
    Hydra crashes with a traceback on any other value (`bits=3.5`, `bits=2.0`, `model=1`,
    `bits=[2,4]`, `model=null`, `task={a:1}`, `bits=range(2,4)`). Run after
    quote_int_group_overrides (which turns `bits=2` into a name); unparsable arguments are left to
    Hydra ("cannot parse the command line")."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, Glob, QuotedString

    groups = config_groups()
    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-"):
            continue
        try:
            (o,) = parser.parse_overrides([arg])
        except Exception:  # noqa: BLE001 - Hydra reports it in its own words
            continue
        key = o.key_or_group
        if o.is_delete() or (key not in groups and "/" not in key):
            continue
        value = o.value()
        if isinstance(value, Glob):
            continue
        options = groups.get(key)
        choose = f"choose one of {', '.join(options)}" if options else "write the option's name"
        hint = " (or set bits.weight / bits.embedding / bits.activation to an integer in 1..8)" if key == "bits" else ""
        given = arg.split("=", 1)[1] if "=" in arg else ""
        if isinstance(value, ChoiceSweep):
            bad = [v for v in value.list if not isinstance(v, (str, QuotedString))]  # 'name' stays quoted here
            if bad and not value.simple_form:  # choice(2,4): Hydra reads the numbers as numbers
                names = ",".join("null" if v is None else str(v) for v in value.list)
                fail(f"{key}={given} is not a sweep of options: write the option names, -m {key}={names}")
            if bad:
                fail(f"{key}={'null' if bad[0] is None else bad[0]} is not an option: {choose}{hint}")
            continue
        if isinstance(value, str):
            continue
        if isinstance(value, list):
            names = ",".join("null" if v is None else str(v) for v in value)
            fail(f"{key}={given} is not an option: a config group takes one option, not a list: {choose}; "
                 f"to run several, sweep with -m {key}={names}")
        if value is None:
            fail(f"{key}=null is not an option: {choose} (leave {key} out for its default)")
        fail(f"{key}={given} is not an option: {choose}{hint}")  # a number, a mapping, a range sweep


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def fail(message: str, new_line: bool = False) -> NoReturn:
    """`new_line`: end a progress bar's unterminated line first, so `error:` starts a line."""
    sys.stdout.flush()
    print(f"{chr(10) if new_line else ''}error: {message}", file=sys.stderr)
    sys.exit(2)


_FAILED_JOBS: list[str] = []  # "#N" of this process's failed multirun jobs


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _job_failed(e: Exception) -> None:
    """A multirun job failed: say which and why now, keep it in the job's dir; the caller re-raises
    so Hydra records the failure and goes on with the next job."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    job = f"#{hc.job.num}"
    reason = user_error_message(e) or f"{type(e).__name__}: {e}"
    line = f"error: job {job} ({' '.join(hc.overrides.task)}) failed: {reason}"
    sys.stdout.flush()
    print(f"\n{line}", file=sys.stderr)
    _FAILED_JOBS.append(job)
    try:
        (Path(hc.runtime.output_dir) / "error.txt").write_text(f"{line}\n\n{traceback.format_exc()}")
    except OSError:
        pass  # the job dir itself may be what failed


def user_error_message(e: BaseException) -> str | None:
    """The one-line message of a user error (QgplmError, a Hydra composition error, a failed
    write), None for anything else (a bug: its traceback is wanted)."""
    from hydra.errors import HydraException

    if isinstance(e, QgplmError):
        return str(e)
    if isinstance(e, HydraException):
        return hydra_error_message(e, sys.argv[1:])
    import yaml

    if isinstance(e, yaml.YAMLError):  # a config file Hydra read: a !!python tag (never constructed) or bad YAML
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = getattr(getattr(e, "problem_mark", None), "name", None) or "a config file"
        return (f"{where} cannot be read ({first}): config files are plain YAML, without !!python tags; fix or "
                f"remove the file")
    return write_error_message(e) if isinstance(e, OSError) else None


def write_error_message(e: OSError) -> str | None:
    """One line for a failed write (full disk, read-only dir, ...), None for other OSErrors."""
    if e.errno not in WRITE_ERRNOS:
        return None
    where = e.filename or "the run dir"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space or set hydra.run.dir=<dir on another disk>; earlier files are left as they were"
    else:
        fix = "set hydra.run.dir=<a writable dir>"
    return f"cannot write {where} ({e.strerror or os.strerror(e.errno)}): {fix}"


def hydra_error_message(e: Exception, argv: list[str]) -> str:
    """Hydra's multi-line composition errors as one line naming the fix."""
    from hydra.errors import MissingConfigException, OverrideParseException

    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options:
        group, _, choice = e.missing_cfg_file.rpartition("/")
        if group:
            msg = f"{group}={choice} is not an option: choose one of {', '.join(e.options)}"
            if group == "bits":
                msg += " (or set bits.weight / bits.embedding / bits.activation to an integer in 1..8)"
            return msg
    if isinstance(e, OverrideParseException):
        return f"cannot parse the command line ({first}): write key=value, quote values with spaces or commas"
    m = re.match(r"Could not override '([^']+)'", first)
    if m:
        key = m.group(1)
        given = next((a for a in argv if a.split("=", 1)[0] == key), f"{key}=...")
        return (f"unknown config key {key}: check its spelling (python -m qgplm.run --cfg job prints every key), "
                f"or add a new key with +{given}")
    m = re.search(r"Could not find '([^']+)'", first)
    if m:
        return f"{m.group(1)} is not a config: check the option name (python -m qgplm.run --help lists them)"
    return f"{first}: check the overrides (python -m qgplm.run --help lists groups and options)"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="run")
def main(cfg: DictConfig) -> float | None:
    return execute(cfg)


def execute(cfg: DictConfig) -> float | None:
    """Validate, run the stages, print the summary; user errors -> one line and exit 2."""
    from qgplm.train.config import RunConfig
    from qgplm.train.console import quiet_console
    from qgplm.train.distributed import distributed_job, global_rank, install_hydra_ddp_fix
    from qgplm.train.pipeline import run_stages
    from qgplm.train.summary import print_summary
    from qgplm.train.targets import check_targets

    quiet_console()
    install_hydra_ddp_fix()

    try:
        run = RunConfig.from_hydra(cfg)
        for section in ("trainer", "callbacks", "logger"):  # every _target_ in the allowlist, before any work
            check_targets(cfg.get(section), section)
    except QgplmError as e:
        _failed(e, new_line=False)
    try:
        with distributed_job():
            metrics = run_stages(run, cfg.trainer, cfg.get("logger"), cfg.get("callbacks"))
    except Exception as e:
        _failed(e, new_line=True)
    if global_rank() == 0:
        print_summary(metrics, run.output_dir)
    return optimized_metric(metrics)


def _failed(e: Exception, new_line: bool) -> NoReturn:
    """Multirun: report the job and re-raise (Hydra goes on with the next job). Single run: a user
    error ends as one line and exit 2; anything else propagates."""
    if _in_multirun():
        _job_failed(e)
        raise e
    msg = user_error_message(e)
    if msg is None:
        raise e
    fail(msg, new_line=new_line)


def optimized_metric(metrics: dict) -> float:
    """What Hydra sweepers (Optuna) minimise: the student's (else the teacher's) best validation
    PPL; the test split is for reporting, never for selection. Test PPL when there was no
    validation (e.g. stage=quantize with 0 steps)."""
    figures = metrics.get("student", metrics["teacher"])
    best_val = figures.get("best_val_ppl")
    return float(best_val if best_val is not None else figures["test_ppl"])


def cli() -> None:
    sys.argv = [sys.argv[0], *quote_int_group_overrides(sys.argv[1:])]
    check_group_overrides(sys.argv[1:])
    # Let Hydra's own errors (composition, callbacks, run-dir creation) reach us as exceptions
    # instead of Hydra's multi-line report, so they end as one line too.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        main()
    except Exception as e:
        if _FAILED_JOBS:  # each was reported when it failed; Hydra re-raises the first at the end
            fail(f"{len(_FAILED_JOBS)} job(s) of the sweep failed: {', '.join(_FAILED_JOBS)}, each reported above "
                 f"and in its job dir's error.txt (with the traceback); fix and re-run those jobs' overrides")
        msg = user_error_message(e)
        if msg is None:
            raise
        fail(msg)


if __name__ == "__main__":
    cli()
