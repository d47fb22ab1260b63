"""Reading torch files (Lightning checkpoints) without running code that a file may carry.

A `.ckpt` is a pickle: loading it with `weights_only=False` calls whatever callable the file
names, so a crafted checkpoint passed as `ckpt_path=` or `ckpt=` would run its own code before
qgplm could look at it. Every torch file qgplm reads goes through `load_torch_file`, which uses
`torch.load(weights_only=True)`: only tensors, plain containers and numbers/strings are rebuilt,
and a file naming any other global is refused with one line. qgplm's own checkpoints hold only
such values (the run identity is a dict of strings and numbers, callback states are tensors and
plain values), so they load this way; Lightning reloads them the same way because qgplm passes
`weights_only=True` to `Trainer.fit`/`Trainer.test`. See docs/security.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from qgplm.errors import QgplmError

REFUSED = "Weights only load failed"


def refused_global(e: BaseException) -> str | None:
    """The global a weights_only load refused (e.g. 'posix.system'), or None for other errors."""
    text = str(e)
    if REFUSED not in text:
        return None
    m = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported global: ([\w.]+)", text)
    return m.group(1) if m else "a Python object"


def load_torch_file(path: str | Path, what: str, fix: str, mmap: bool = False) -> Any:
    """torch.load(path, weights_only=True) on CPU; QgplmError('<what> ...: <fix>') when the file
    names a Python global (it could run code) or cannot be read (truncated, not a torch file)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - unpickling, zip and I/O errors all mean an unusable file
        name = refused_global(e)
        if name is not None:
            raise QgplmError(f"{what} holds a Python object ({name}) beyond tensors and plain values, which qgplm "
                             f"does not load because it could run code: {fix}") from None
        raise QgplmError(f"{what} cannot be read ({type(e).__name__}): it is truncated or corrupt; {fix}") from None
