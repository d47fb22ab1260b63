"""Which network to build: the `model` section of a run, declared here beside the loaders that read it,
so that loading a model needs no training application."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qgplm.checks import choice as _choice
from qgplm.errors import QgplmError

MODEL_KINDS = ("causal", "seq2seq")


@dataclass
class ModelConfig:
    """Which network to build. `name_or_path=None` builds `arch` from `config` with random init."""

    name: str
    kind: str = "causal"
    name_or_path: str | None = None
    arch: str = "gpt2"
    config: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None  # None: the task's own tokenizer, else name_or_path (or the GGUF file's)
    # a GGUF teacher (weights and tokenizer): any path, or the one .gguf file that an installed package ships
    # ("name" or "name==version"); name_or_path, when set, comes first (e.g. the hub's FP original)
    gguf_file: str | None = None
    gguf_package: str | None = None

    def validate(self) -> None:
        _choice("model.kind", self.kind, MODEL_KINDS)
        if self.name_or_path is None and self.gguf_file is None and self.gguf_package is None and not self.config:
            raise QgplmError("model: set model.name_or_path=<hub name or dir>, model.gguf_file=<path to a .gguf "
                             "file> or model.config for a random init")

    @property
    def from_gguf(self) -> bool:
        """The teacher comes from a GGUF file (no name_or_path given, a GGUF file or package named)."""
        return self.name_or_path is None and (self.gguf_file is not None or self.gguf_package is not None)
