"""Loading teachers and tokenizers (hub names, local dirs, random-init configs)."""

from qgplm.models.loading import build_model, check_compatible, load_pretrained, load_tokenizer, save_model

__all__ = ["build_model", "check_compatible", "load_pretrained", "load_tokenizer", "save_model"]
