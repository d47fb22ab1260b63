"""qgplm: quantization-aware training with distillation for GPT-2 / BART (QuantGPT)."""

from __future__ import annotations

from typing import Any


def load_quantized(export_dir: Any, mode: str = "dequantize") -> Any:
    """Load a packed export as a ready HF model (see qgplm.export.loader). Imported lazily so
    that `import qgplm` stays cheap."""
    from qgplm.export.loader import load_quantized as _load

    return _load(export_dir, mode)


__all__ = ["load_quantized"]
