"""`mode=gguf`: a GGUF file run by llama.cpp through llama-cpp-python (the `gguf` extra), behind token ids
in and out (`LlamaCppLM`) or a HF causal LM's forward (`LlamaCppCausalLM`). The file is written by
`qgplm.export.converters.gguf`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qgplm.errors import QgplmError, optional_module

GGUF_FILE = "model.gguf"


def _llama_cpp():
    return optional_module("llama_cpp", "running a GGUF file (mode=gguf)", "use mode=lowbit")


def context_length(config: Any) -> int:
    """The longest sequence the model has positions for (GPT-2's n_positions, Llama's max_position_embeddings)."""
    return getattr(config, "n_positions", None) or config.max_position_embeddings


def gguf_path(path: str | Path) -> Path:
    """The model.gguf of an export dir, or a .gguf file itself."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / GGUF_FILE
    if not p.is_file():
        raise QgplmError(f"{p} does not exist: write it with python -m qgplm.export ... format=gguf")
    return p


class LlamaCppLM:
    """A GGUF model on llama.cpp (through llama-cpp-python): logits of token ids and greedy decoding.

    Token ids in, token ids out (the tokenizer stays the export's HF tokenizer, so qgplm's and
    llama.cpp's runs are compared on the same ids); `n_ctx` is the longest sequence it holds."""

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int | None = None):
        llama_cpp = _llama_cpp()
        threads = threads or torch.get_num_threads()
        try:
            self.llm = llama_cpp.Llama(model_path=str(gguf_path(path)), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                       n_threads=threads, n_threads_batch=threads, logits_all=True,
                                       verbose=False, use_mmap=True)
        except ValueError as e:
            raise QgplmError(f"llama.cpp cannot load {path} ({e}): export it again with format=gguf") from None
        self.n_ctx = n_ctx

    def logits(self, ids: list[int]) -> np.ndarray:
        """float32 [len(ids), vocab]: the logits after every prefix (a fresh context)."""
        if not 0 < len(ids) <= self.n_ctx:
            raise QgplmError(f"{len(ids)} tokens do not fit n_ctx={self.n_ctx}: pass 1..{self.n_ctx} tokens")
        self.llm.reset()
        self.llm.eval(list(map(int, ids)))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
        """The greedy continuation of `ids` (KV-cached: one token per step after the prompt)."""
        if len(ids) + max_new_tokens > self.n_ctx:
            raise QgplmError(f"{len(ids)} + {max_new_tokens} tokens do not fit n_ctx={self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(map(int, ids)))
        new: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            new.append(nxt)
            if nxt == eos_token_id:
                break
            self.llm.eval([nxt])
        return new

    def close(self) -> None:
        self.llm.close()


class LlamaCppCausalLM(torch.nn.Module):
    """A GGUF model behind the interface of a HF causal LM forward, for qgplm's evaluation code
    (perplexity, `experiments/bench_lowbit_quality.py`): `forward(input_ids, attention_mask)`
    returns an object with `.logits` [batch, seq, vocab]. Rows run one at a time on llama.cpp;
    right padding is skipped (its logits are 0: qgplm's losses ignore padded labels), left padding
    is refused (llama.cpp's positions would differ from HF's)."""

    def __init__(self, path: str | Path, config: Any, n_ctx: int | None = None, threads: int | None = None):
        super().__init__()
        self.config = config
        self.lm = LlamaCppLM(path, n_ctx=n_ctx or context_length(config), threads=threads)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: Any) -> Any:
        from types import SimpleNamespace

        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        out = torch.zeros(*input_ids.shape, self.config.vocab_size)
        for i, (row, m) in enumerate(zip(input_ids.tolist(), mask.bool(), strict=True)):
            n = int(m.sum())
            if not bool(m[:n].all()):
                raise QgplmError("llama.cpp rows must be right-padded (or unpadded): left padding shifts positions")
            if n:
                out[i, :n] = torch.from_numpy(self.lm.logits(row[:n]))
        return SimpleNamespace(logits=out, loss=None, hidden_states=None)


__all__ = ["GGUF_FILE", "LlamaCppCausalLM", "LlamaCppLM", "context_length", "gguf_path"]
