"""Quantization: quantizers, quantized layers and the `quantize_model` entry point."""

from qgplm.quant import baselines  # noqa: F401  (registers pact, lsq, laq, twn, minmax, quantgpt_pact_grad)
from qgplm.quant.api import (
    initialize_quantizers,
    quantization_disabled,
    quantize_,
    quantize_model,
    quantized_modules,
    scale_parameters,
    set_quantization_enabled,
    weight_quantizers,
)
from qgplm.quant.config import QuantConfig
from qgplm.quant.modules import QuantConv1D, QuantEmbedding, QuantLinear
from qgplm.quant.quantizers import (
    WEIGHT_QUANTIZERS,
    ActivationQuantizer,
    DynamicScaleQuantizer,
    WeightQuantizer,
    register_weight_quantizer,
)
from qgplm.quant.size import SizeReport, model_size

__all__ = [
    "WEIGHT_QUANTIZERS", "ActivationQuantizer", "DynamicScaleQuantizer", "QuantConfig", "QuantConv1D",
    "QuantEmbedding", "QuantLinear", "SizeReport", "WeightQuantizer", "initialize_quantizers",
    "model_size", "quantization_disabled", "quantize_", "quantize_model", "quantized_modules",
    "register_weight_quantizer", "scale_parameters", "set_quantization_enabled", "weight_quantizers",
]
