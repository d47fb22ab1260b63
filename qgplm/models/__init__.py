"""Loading teachers and tokenizers (hub names, local dirs, GGUF files, random-init configs)."""

from qgplm.models.gguf import gguf_source, load_gguf_model, load_gguf_tokenizer, packaged_gguf
from qgplm.models.loading import build_model, check_compatible, load_pretrained, load_tokenizer, save_model

__all__ = ["build_model", "check_compatible", "gguf_source", "load_gguf_model", "load_gguf_tokenizer",
           "load_pretrained", "load_tokenizer", "packaged_gguf", "save_model"]
