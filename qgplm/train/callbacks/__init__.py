"""Lightning callbacks that own method state: the contrastive memory bank, the scale warm-up and
LAQ's curvature feed; the RNG state for exact resume; the training throughput for metrics.json."""

from qgplm.train.callbacks.bank_update import MemoryBankCallback
from qgplm.train.callbacks.exact_resume import KillAtStepCallback, RNGStateCallback
from qgplm.train.callbacks.laq import LAQCurvatureCallback
from qgplm.train.callbacks.quant_stats import QuantStatsCallback
from qgplm.train.callbacks.scale_warmup import ScaleWarmupCallback
from qgplm.train.callbacks.throughput import ThroughputCallback

__all__ = [
    "KillAtStepCallback", "LAQCurvatureCallback", "MemoryBankCallback", "QuantStatsCallback", "RNGStateCallback",
    "ScaleWarmupCallback", "ThroughputCallback",
]
