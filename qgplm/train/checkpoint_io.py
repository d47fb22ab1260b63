"""Lightning's checkpoint writer, made atomic with qgplm.io's temp-file-and-rename."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from qgplm.io import atomic_write_bytes


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temp file and renamed into place: a crash (or SIGKILL)
    mid-save leaves the previous `last.ckpt` intact instead of a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        atomic_write_bytes(Path(path), buf.getvalue())
