"""The shared front of the runtime formats (format=onnx, format=gguf): each converts a packed qgplm
export directory, so a model passed instead is exported to the packed format first, in a
temporary directory, and the same checks guard every format."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qgplm.errors import QgplmError
from qgplm.quant.modules import KernelLayer


def via_packed_export(source: Any, tokenizer: Any, export_kwargs: dict[str, Any], check_model: Callable[[Any], None],
                      convert: Callable[[Path], Any], prefix: str) -> Any:
    """convert(<packed export dir>) of `source`: a qgplm export directory, or a model (a trained
    student, or a float model quantized post-training with `export_kwargs` as in `export_model`)."""
    if isinstance(source, (str, Path)):
        if tokenizer is not None or export_kwargs:
            raise QgplmError("a qgplm export directory already holds its tokenizer and bit-widths: pass only the dir")
        return convert(Path(source))
    check_model(source)
    kernel = next((m for m in source.modules() if isinstance(m, KernelLayer)), None)
    if kernel is not None:
        raise QgplmError(f"cannot export a model loaded in {kernel.mode} mode: pass its qgplm export directory")
    from qgplm.export.format.writer import export_model

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        export_model(source, Path(tmp) / "packed", tokenizer, **export_kwargs)
        return convert(Path(tmp) / "packed")
