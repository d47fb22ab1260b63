"""Distillation: logits KD, token-level contrastive loss and its memory bank."""

from qgplm.distill.losses import soft_cross_entropy, token_contrastive_loss
from qgplm.distill.memory_bank import MemoryBank

__all__ = ["MemoryBank", "soft_cross_entropy", "token_contrastive_loss"]
