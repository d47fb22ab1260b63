"""One console line per message: Lightning's logging routed through the handlers Hydra configured,
and third-party noise a user cannot act on dropped at its source.

Why each step:
- `import lightning` adds its own StreamHandler ("INFO: ...", stderr) to the `lightning` logger, which
  also propagates to the root logger, where Hydra's job logging has a console handler and the run's
  `run.log` file handler: every Lightning message reached the console twice. If `lightning.pytorch`
  or `lightning.fabric` were imported before Hydra configured logging, each also has its own handler
  and `propagate=False`, so their messages skipped `run.log`. Removing those console handlers and
  letting the records propagate gives one console line and a `run.log` line for each.
- Lightning's trainer logs "💡 Tip: ... try installing litlogger / litmodels" on every fit: an
  advertisement, not about the run; dropped by a filter on the one logger that emits it.
- A console handler whose stream is closed (an earlier in-process run in the same interpreter, a test's
  captured stream, configured its handlers on a stream closed since) turns every record into logging's own
  "--- Logging error ---" traceback: such handlers are removed before the run logs anything.
- `lightning.pytorch.utilities._pytree` still uses torch's deprecated `LeafSpec` (a FutureWarning
  on every fit), which a qgplm user cannot change: ignored by its exact message, category and the
  module it is reported from, not globally.
- Lightning warns at every fit start that "Found N module(s) in eval mode": in distillation that is
  the frozen teacher, in eval mode on purpose (dropout off). `eval_mode_teacher_expected` silences
  the warning around the student's fit when, and only when, every eval-mode module is the teacher's,
  so a student module left in eval mode by mistake is still reported.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

from torch import nn

# Loggers that `import lightning` gives a console handler of their own.
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
# The logger Lightning's `rank_zero_info` writes through (where the tips come from).
_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"

# (message regex, module regex, category) of warnings the user cannot act on.
UNACTIONABLE_WARNINGS: tuple[tuple[str, str, type[Warning]], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree", FutureWarning),
)


class _DropTips(logging.Filter):
    """Drops Lightning's "💡 Tip:" records (litlogger / litmodels advertisements)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith("💡 Tip:")


_DROP_TIPS = _DropTips()


def drop_closed_stream_handlers() -> None:
    """Remove every StreamHandler (root and named loggers) whose stream is closed: it can only fail."""
    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                logger.removeHandler(handler)


def quiet_console() -> None:
    """Route Lightning's log records through the root handlers (Hydra's console + run.log) once each,
    drop its tips and ignore the listed unactionable warnings, after removing handlers left on closed
    streams. Idempotent; a no-op for Lightning's handlers when the root logger has none (qgplm used as
    a library without Hydra: Lightning's own console handler is then the only one, and is kept)."""
    import lightning  # noqa: F401  (importing it is what adds the handlers removed here)

    drop_closed_stream_handlers()

    if logging.getLogger().handlers:
        for name in _LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                # exactly Lightning's console handler: never a FileHandler or a test's capture handler
                if type(handler) is logging.StreamHandler:
                    logger.removeHandler(handler)
            logger.propagate = True
    logging.getLogger(_RANK_ZERO_LOGGER).addFilter(_DROP_TIPS)  # addFilter skips a filter already there
    for message, module, category in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


@contextlib.contextmanager
def eval_mode_teacher_expected(module: nn.Module, teacher: str = "teacher") -> Iterator[None]:
    """Around `trainer.fit(module)`: ignore Lightning's eval-mode warning if every module in eval
    mode is `module.<teacher>` or below it (the frozen teacher); otherwise it is shown as usual."""
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    others = [name for name, m in module.named_modules()
              if not m.training and name != teacher and not name.startswith(f"{teacher}.")]
    with warnings.catch_warnings():
        if not others:
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training",
                                    category=PossibleUserWarning)
        yield
