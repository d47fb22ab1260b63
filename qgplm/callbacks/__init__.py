"""Lightning callbacks that own method state: the contrastive memory bank, the scale warm-up and
LAQ's curvature feed; the RNG state for exact resume; the training throughput for metrics.json."""

from qgplm.callbacks.laq import LAQCurvatureCallback
from qgplm.callbacks.memory_bank import MemoryBankCallback
from qgplm.callbacks.quant_stats import QuantStatsCallback
from qgplm.callbacks.resume import KillAtStepCallback, RNGStateCallback
from qgplm.callbacks.scale_warmup import ScaleWarmupCallback
from qgplm.callbacks.throughput import ThroughputCallback

__all__ = [
    "KillAtStepCallback", "LAQCurvatureCallback", "MemoryBankCallback", "QuantStatsCallback", "RNGStateCallback",
    "ScaleWarmupCallback", "ThroughputCallback",
]
