"""Model size with the paper's accounting (docs/method.md): b bits per quantized weight element plus
one 32-bit scale per quantized tensor (or per row), 32 bits for everything kept in FP (parameters
and persistent float buffers such as BART's final_logits_bias)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from qgplm.quant.api import quantized_modules
from qgplm.quant.quantizers import ActivationQuantizer, WeightQuantizer

MIB = 2**20


@dataclass
class SizeReport:
    fp32_bytes: float
    quantized_bytes: float
    codes_bytes: float
    scales_bytes: float
    fp_bytes: float

    @property
    def fp32_mib(self) -> float:
        return self.fp32_bytes / MIB

    @property
    def quantized_mib(self) -> float:
        return self.quantized_bytes / MIB

    @property
    def compression(self) -> float:
        return self.fp32_bytes / self.quantized_bytes

    def as_dict(self) -> dict[str, float]:
        d = asdict(self)
        d.update(fp32_mib=self.fp32_mib, quantized_mib=self.quantized_mib, compression=self.compression)
        return d


def model_size(model: nn.Module) -> SizeReport:
    """Size of `model` in FP32 and as quantized by `quantize_model` (bits of its quantizers).

    Tied parameters are counted once. A float model reports quantized == fp32.
    """
    params = {id(p): p for p in model.parameters()}

    quant_bits: dict[int, int] = {}
    scale_elems: dict[int, int] = {}
    for _, mod in quantized_modules(model):
        q = mod.weight_quantizer
        if q.bits < 32:
            quant_bits[id(mod.weight)] = q.bits
            scale_elems[id(mod.weight)] = q.num_rows if q.per_row else 1
    scale_param_ids = {id(p) for m in model.modules() if hasattr(m, "scale_parameters") for p in m.scale_parameters()}
    # Persistent floating-point buffers are model state kept in FP32 too (docs/method.md: BART's
    # final_logits_bias); quantizer state (e.g. the `initialized` flag) is not model weight.
    for m in model.modules():
        if isinstance(m, (WeightQuantizer, ActivationQuantizer)):
            continue
        for bname, b in m._buffers.items():
            if b is not None and b.is_floating_point() and bname not in m._non_persistent_buffers_set:
                params.setdefault(id(b), b)
    fp32 = codes = scales = fp = 0.0
    for pid, p in params.items():
        if pid in scale_param_ids:
            continue  # counted as scales below, per quantized tensor
        n = p.numel()
        fp32 += 32 * n
        if pid in quant_bits:
            codes += quant_bits[pid] * n
            scales += 32 * scale_elems[pid]
        else:
            fp += 32 * n

    return SizeReport(fp32 / 8, (codes + scales + fp) / 8, codes / 8, scales / 8, fp / 8)
