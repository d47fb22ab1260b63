"""Lightning callbacks that own method state: the contrastive memory bank, the scale warm-up and
LAQ's curvature feed; and the RNG state for exact resume."""

from qgplm.callbacks.laq import LAQCurvatureCallback
from qgplm.callbacks.memory_bank import MemoryBankCallback
from qgplm.callbacks.quant_stats import QuantStatsCallback
from qgplm.callbacks.resume import KillAtStepCallback, RNGStateCallback
from qgplm.callbacks.scale_warmup import ScaleWarmupCallback

__all__ = [
    "KillAtStepCallback", "LAQCurvatureCallback", "MemoryBankCallback", "QuantStatsCallback", "RNGStateCallback",
    "ScaleWarmupCallback",
]
