"""Tokenizer metadata of a GGUF file, as llama.cpp's converter (convert_hf_to_gguf.py) writes it for
a byte-level BPE (GPT-2 style: GPT-2, SmolLM2, Llama 3, Qwen2): tokenizer.ggml.model "gpt2", the
pre-tokenizer's name, the vocabulary and its token types, the merges, the special token ids, whether
a BOS is added, and the chat template (the last three through gguf's SpecialVocab, as the converter).

The pre-tokenizer is named as the converter names it: by the sha256 of the ids of its check text
(the families qgplm exports; the converter's table has more), else from the HF pre-tokenizer's
structure when it is one of the regexes llama.cpp implements ("gpt-2": GPT-2's byte-level regex;
"smollm": single digits, then that regex).
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any

from qgplm.errors import QgplmError

# convert_hf_to_gguf.py's get_vocab_base_pre: the text whose token ids identify a pre-tokenizer
CHKTXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenate'
    'd) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314'
    '151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told '
    "he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_BY_HASH = {  # the converter's hashes of the families qgplm exports
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
}
PRE_TOKENIZERS = sorted(set(PRE_BY_HASH.values()))


def _steps(state: dict[str, Any]) -> list[dict[str, Any]]:
    pre = state.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]


def _gpt2_regex(step: dict[str, Any]) -> bool:
    return step.get("type") == "ByteLevel" and step.get("use_regex", True) and not step.get("add_prefix_space")


def _pre_from_structure(state: dict[str, Any]) -> str | None:
    steps = _steps(state)
    if state.get("normalizer") is not None:
        return None
    if len(steps) == 1 and _gpt2_regex(steps[0]):
        return "gpt-2"
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and _gpt2_regex(steps[1]):
        return "smollm"
    return None


def pre_tokenizer_name(tokenizer: Any, state: dict[str, Any]) -> str:
    """tokenizer.ggml.pre: llama.cpp's name of the tokenizer's pre-tokenizer (see the module doc)."""
    digest = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    name = PRE_BY_HASH.get(digest) or _pre_from_structure(state)
    if name is None:
        raise QgplmError(f"the tokenizer's pre-tokenizer is not one qgplm can name for llama.cpp (check-text hash "
                         f"{digest[:16]}..., known: {', '.join(PRE_TOKENIZERS)}): use format=onnx or mode=lowbit")
    return name


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special: added tokens that act as control tokens."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def vocab_list(tokenizer: Any, n_vocab: int, gguf: Any) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0..n_vocab-1, as the converter's get_vocab_base: added tokens
    are CONTROL when special, else USER_DEFINED; ids the tokenizer lacks are [PAD<i>], UNUSED."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise QgplmError(f"the tokenizer has ids up to {max(vocab.values())}, beyond the model's {n_vocab} "
                         f"embeddings: export the model with its own tokenizer")
    reverse = {i: t for t, i in vocab.items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        token = reverse.get(i)
        kind = gguf.TokenType.NORMAL
        if token is None:
            token, kind = f"[PAD{i}]", gguf.TokenType.UNUSED
        elif token in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                kind = gguf.TokenType.CONTROL
            else:
                token, kind = token.replace("\u2581", " "), gguf.TokenType.USER_DEFINED
        tokens.append(token)
        types.append(kind)
    return tokens, types


def _adds_bos(tokenizer: Any) -> bool:
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def add_tokenizer(writer: Any, gguf: Any, tokenizer: Any, tokenizer_dir: Path, n_vocab: int) -> None:
    """The byte-level BPE as llama.cpp's "gpt2" tokenizer; "none" (ids only) without a tokenizer.
    `tokenizer_dir` holds its saved files (tokenizer.json, tokenizer_config.json, config.json)."""
    if tokenizer is None:
        writer.add_tokenizer_model("none")
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {"model": {"type": type(tokenizer).__name__}}
    if state["model"]["type"] != "BPE" or not any(s.get("type") == "ByteLevel" for s in _steps(state)):
        raise QgplmError(f"format=gguf writes byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3, Qwen2), not this "
                         f"{state['model']['type']} one: use format=onnx or mode=lowbit")
    tokens, types = vocab_list(tokenizer, n_vocab, gguf)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, state))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=n_vocab)
    special.add_special_token.setdefault("bos", _adds_bos(tokenizer))
    special.add_to_gguf(writer, quiet=True)
    config_file = tokenizer_dir / "tokenizer_config.json"
    prefix = json.loads(config_file.read_text()).get("add_prefix_space") if config_file.is_file() else None
    if prefix is not None:
        writer.add_add_space_prefix(prefix)


__all__ = ["CHKTXT", "PRE_BY_HASH", "add_tokenizer", "pre_tokenizer_name", "vocab_list"]
