"""Lightning callbacks that own method state: the contrastive memory bank and the scale warm-up."""

from qgplm.callbacks.memory_bank import MemoryBankCallback
from qgplm.callbacks.scale_warmup import ScaleWarmupCallback

__all__ = ["MemoryBankCallback", "ScaleWarmupCallback"]
