"""`ExportReport`: what one export wrote, the same type for every format (qgplm, onnx, gguf).

Every format fills the common part: the files that hold the model with their bytes on disk, the
FP32 size of the same tensors (the reference of the compression ratio) and, where the format
knows them, the counts behind bits per weight. The rest is per-format detail and stays empty
(None, {} or []) where a format has none: the qgplm format's split of its safetensors file into
packed codes, scales and FP tensors; GGUF's tensor types, how 2-bit rows were held, the fp16
rounding of the steps and notes on what llama.cpp does differently. `table()` prints the lines
that are present; `as_dict()` is what run summaries and the export manifest store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from qgplm.quant.size import MIB

_W = 28  # label column of table()


@dataclass
class ExportReport:
    """Byte counts of one export. `files`: name -> bytes on disk of each file holding the model
    (graphs and weights; config and tokenizer files are not counted). `fp32_bytes`: the same
    tensors, deduplicated, all in FP32. `weights` / `quant_weights`: elements of the stored tensors
    / of the quantized ones, `quant_bytes` the bytes of the quantized ones (codes and scales)."""

    out_dir: str
    format: str  # "qgplm", "onnx" or "gguf"
    files: dict[str, int]
    fp32_bytes: int
    weights: int = 0
    quant_weights: int = 0
    quant_bytes: int = 0
    # format=qgplm: its safetensors file split by what the bytes hold
    codes_bytes: int | None = None
    scales_bytes: int | None = None
    fp_bytes: int | None = None
    # format=gguf
    types: dict[str, str] = field(default_factory=dict)  # GGUF tensor name -> GGML type
    held_as: dict[str, list[str]] = field(default_factory=dict)  # why a type was chosen -> packed tensors
    max_step_rounding: float | None = None  # largest |fp16(step) - step| / step over the quantized tensors
    notes: list[str] = field(default_factory=list)

    @property
    def file_bytes(self) -> int:
        """Bytes on disk of the files holding the model, all together."""
        return sum(self.files.values())

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.file_bytes

    @property
    def bits_per_weight(self) -> float | None:
        """The files' bits per weight (headers, tokenizer and FP tensors included); None if not counted."""
        return 8 * self.file_bytes / self.weights if self.weights else None

    @property
    def quant_bits_per_weight(self) -> float | None:
        """Bits per weight of the quantized tensors as stored (codes and scales); None if there are none."""
        return 8 * self.quant_bytes / self.quant_weights if self.quant_weights else None

    def table(self) -> str:
        def mib(name: str, b: int) -> str:
            return f"{name:<{_W}}{b / MIB:>10.2f} MiB"

        lines = []
        if self.types:
            counts: dict[str, int] = {}
            for t in self.types.values():
                counts[t] = counts.get(t, 0) + 1
            lines.append(f"{'tensors':<{_W}}{', '.join(f'{n} {t}' for t, n in sorted(counts.items()))}")
        for name, b in (("packed codes", self.codes_bytes), ("scales", self.scales_bytes),
                        ("FP tensors", self.fp_bytes)):
            if b is not None:
                lines.append(mib(name, b))
        lines += [mib(f"{name} on disk", b) for name, b in self.files.items()]
        if len(self.files) > 1:
            lines.append(mib(f"{self.format.upper()} total", self.file_bytes))
        lines += [mib("FP32 tensors (reference)", self.fp32_bytes), f"{'compression':<{_W}}{self.ratio:>10.2f} x"]
        if self.bits_per_weight is not None:
            quant = self.quant_bits_per_weight
            lines.append(f"{'bits per weight':<{_W}}{self.bits_per_weight:>10.3f} (file)"
                         + ("" if quant is None else f", {quant:.3f} (quantized tensors)"))
        if self.max_step_rounding is not None:
            lines.append(f"{'step rounding to fp16':<{_W}}{self.max_step_rounding:>10.2e} (largest relative)")
        held = [f"{why}: {len(keys)} tensor(s), e.g. {keys[0]}" for why, keys in self.held_as.items()]
        return "\n".join(lines + [f"note: {n}" for n in self.notes + held])

    def as_dict(self) -> dict[str, Any]:
        """The fields a format filled (None and empty detail left out) and the derived sizes."""
        d = {k: v for k, v in asdict(self).items() if v is not None and v != {} and v != []}
        derived = {"file_bytes": self.file_bytes, "ratio": self.ratio, "bits_per_weight": self.bits_per_weight,
                   "quant_bits_per_weight": self.quant_bits_per_weight}
        return {**d, **{k: v for k, v in derived.items() if v is not None}}


__all__ = ["ExportReport"]
