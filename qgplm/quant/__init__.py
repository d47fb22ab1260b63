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
from qgplm.quant.modules import QuantConv1D, QuantEmbedding, QuantLinear
from qgplm.quant.quantizers import ActivationQuantizer, DynamicScaleQuantizer, WeightQuantizer
from qgplm.quant.recipe import QuantConfig
from qgplm.quant.registry import (
    QUANTIZER_KINDS,
    WEIGHT_QUANTIZERS,
    QuantizerKind,
    kind_of,
    quantizer_kind,
    register_weight_quantizer,
)
from qgplm.quant.size import SizeReport, model_size
from qgplm.quant.walk import swap_modules

__all__ = [
    "QUANTIZER_KINDS", "WEIGHT_QUANTIZERS", "ActivationQuantizer", "DynamicScaleQuantizer", "QuantConfig",
    "QuantConv1D", "QuantEmbedding", "QuantLinear", "QuantizerKind", "SizeReport", "WeightQuantizer",
    "initialize_quantizers", "kind_of", "model_size", "quantization_disabled", "quantize_", "quantize_model",
    "quantized_modules", "quantizer_kind", "register_weight_quantizer", "scale_parameters",
    "set_quantization_enabled", "swap_modules", "weight_quantizers",
]
