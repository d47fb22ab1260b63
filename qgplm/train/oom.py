"""Out of GPU memory -> one line naming the batch size to lower.

`explain_out_of_memory` wraps `run_stages`: a `torch.OutOfMemoryError` raised while training
names `task.batch_size`, one raised in an evaluation loop (validation inside fit, or test)
names `task.eval_batch_size`, each with a halved value to try.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from qgplm.errors import QgplmError

F = TypeVar("F", bound=Callable[..., Any])


def in_evaluation(exc: BaseException) -> bool:
    """Was `exc` raised inside Lightning's evaluation loop (validation or test)?"""
    return any(f.filename.endswith("evaluation_loop.py") or f.name in ("validation_step", "test_step")
               for f in traceback.extract_tb(exc.__traceback__))


def out_of_memory_error(exc: BaseException, task: Any) -> QgplmError:
    key = "task.eval_batch_size" if in_evaluation(exc) else "task.batch_size"
    size = task.eval_batch_size if key == "task.eval_batch_size" else task.batch_size
    lengths = "".join(f"{k}={n} or " for k, n in task.sequence_lengths()[:1])  # the task's longest sequences
    return QgplmError(f"out of GPU memory with {key}={size}: lower it, e.g. {key}={max(1, size // 2)} "
                      f"(or {lengths}the model size)")


def explain_out_of_memory(fn: F) -> F:
    """Decorate `fn(cfg: RunConfig, ...)`."""

    @functools.wraps(fn)
    def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(cfg, *args, **kwargs)
        except torch.OutOfMemoryError as e:
            raise out_of_memory_error(e, cfg.task) from None

    return wrapper  # type: ignore[return-value]
