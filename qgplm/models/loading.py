"""Build or load the teacher, and its tokenizer, from a hub name, a local directory or a config.

- `model.name_or_path=<dir>`: a local Hugging Face checkpoint (config.json + weights).
- `model.name_or_path=<hub name>`: the hub, if reachable (or already in the local HF cache);
  offline, fail at once naming both offline alternatives.
- `model.gguf_file=<path>` / `model.gguf_package=<pip package>`: a GGUF file (qgplm.models.gguf).
- `model.name_or_path=null`: a random-init `model.arch` built from `model.config`, sized to the
  tokenizer (used by tiny_gpt2 and the offline teachers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GPT2TokenizerFast,
    PreTrainedModel,
)

from qgplm.errors import QgplmError
from qgplm.hub import hub_reachable
from qgplm.models.gguf import gguf_source, load_gguf_model
from qgplm.models.spec import ModelConfig
from qgplm.safeload import refused_global

# Passed to every from_pretrained: False, not transformers' default None, which on a folder whose
# config asks for custom code (`auto_map`) prompts "Do you wish to run the custom code? [y/N]"
# instead of refusing; weights_only=True (transformers' default, pinned) for a pickled .bin.
NO_REMOTE_CODE = {"trust_remote_code": False}
CUSTOM_CODE = "contains custom code"  # transformers' words when it refuses an auto_map


def custom_code_error(key: str, name: str) -> QgplmError:
    return QgplmError(f"{key}={name} asks for custom Python code (auto_map in its config), which qgplm never runs: "
                      f"pass a folder of a model transformers supports without trust_remote_code (docs/security.md)")

AUTO_CLASSES = {"causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


def _offline_error(what: str, name: str, key: str) -> QgplmError:
    return QgplmError(
        f"{what} {name!r} is not a local directory and the Hugging Face hub is unreachable: pass "
        f"{key}=<local dir with a saved model> or use model=tiny_gpt2 / model=tiny_bart (offline, random init)")


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def _check_local_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise QgplmError(f"model path {path} is not a directory: pass a folder written by save_pretrained")
    if not (path / "config.json").is_file():
        raise QgplmError(f"{path} has no config.json: pass a folder written by save_pretrained")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise QgplmError(f"{path} has no weights ({' or '.join(WEIGHT_FILES[:2])}): "
                         "save the model with save_pretrained")


def _resolve(name: str, what: str, key: str) -> tuple[str, bool]:
    """(name or absolute path, local_files_only)."""
    if _is_local(name):
        return str(Path(name).expanduser().resolve()), True
    if hub_reachable():
        return name, False
    return name, True  # maybe in the HF cache; the caller turns a miss into _offline_error


def _bare_bpe_dir(path: Path) -> bool:
    """vocab.json + merges.txt and nothing saying which class: a bare GPT-2-style BPE folder."""
    return (path / "vocab.json").is_file() and (path / "merges.txt").is_file() and not any(
        (path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def load_tokenizer(name_or_path: str, key: str = "model.tokenizer", bare_bpe_class: type = GPT2TokenizerFast) -> Any:
    """AutoTokenizer for saved/hub tokenizers; a bare vocab.json + merges.txt folder (as in
    ../shared/data/gpt2-tokenizer) is read with `bare_bpe_class` (GPT-2 byte-level BPE)."""
    name, local_only = _resolve(name_or_path, "tokenizer", key)
    try:
        if local_only and _bare_bpe_dir(Path(name)):
            tok = bare_bpe_class.from_pretrained(name)
        else:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only, **NO_REMOTE_CODE)
    except (OSError, ValueError) as e:
        if CUSTOM_CODE in str(e):
            raise custom_code_error(key, name_or_path) from None
        if _is_local(name_or_path):
            raise QgplmError(f"cannot load a tokenizer from {name_or_path}: {str(e).splitlines()[0]} "
                             f"(the folder needs tokenizer.json or vocab.json + merges.txt)") from None
        raise _offline_error("tokenizer", name_or_path, key) from None
    if len(tok) == 0:
        raise QgplmError(f"tokenizer at {name_or_path} is empty: "
                         "the folder needs tokenizer.json or vocab.json + merges.txt")
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_pretrained(name_or_path: str, kind: str = "causal", key: str = "model.name_or_path") -> PreTrainedModel:
    if _is_local(name_or_path):
        _check_local_model_dir(Path(name_or_path).expanduser())
    name, local_only = _resolve(name_or_path, "model", key)
    try:
        model = AUTO_CLASSES[kind].from_pretrained(name, local_files_only=local_only, weights_only=True,
                                                   **NO_REMOTE_CODE)
    except ValueError as e:
        if CUSTOM_CODE in str(e):
            raise custom_code_error(key, name_or_path) from None
        if "Unrecognized configuration class" not in str(e):
            raise
        config = AutoConfig.from_pretrained(name, local_files_only=local_only, **NO_REMOTE_CODE)
        model_type = getattr(config, "model_type", "?")
        other = next(k for k in AUTO_CLASSES if k != kind)
        raise QgplmError(f"{key}={name_or_path} holds a {model_type} model, which model.kind={kind} cannot load: "
                         f"set model.kind={other} (or pass a {kind} model)") from None
    except OSError as e:
        if _is_local(name_or_path):
            raise QgplmError(f"cannot load the model in {name_or_path}: {str(e).splitlines()[0]}") from None
        raise _offline_error("model", name_or_path, key) from None
    except Exception as e:  # truncated/corrupt weights: SafetensorError, torch.load's RuntimeError/EOFError
        if not _is_local(name_or_path):
            raise
        refused = refused_global(e)
        if refused is not None:  # a pickled .bin naming a global: torch.load(weights_only=True) refused it unrun
            raise QgplmError(f"the weights in {name_or_path} hold a Python object ({refused}) beyond tensors, which "
                             f"qgplm does not load because it could run code: pass a model saved with "
                             f"save_pretrained (model.safetensors)") from None
        raise QgplmError(f"the weights in {name_or_path} are truncated or corrupt ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}): save the model again or re-run the stage "
                         f"that wrote it") from None
    return model


def build_model(cfg: ModelConfig, tokenizer: Any, max_positions: int) -> PreTrainedModel:
    """The full-precision model: loaded from `name_or_path` or a GGUF file, or random-init from `arch` + `config`."""
    if cfg.name_or_path is not None:
        model = load_pretrained(cfg.name_or_path, cfg.kind)
    elif cfg.from_gguf:
        model = load_gguf_model(gguf_source(cfg.gguf_file, cfg.gguf_package), cfg.kind)
    else:
        special = {k: getattr(tokenizer, f"{k}_id") for k in ("bos_token", "eos_token", "pad_token")}
        special = {f"{k}_id": v for k, v in special.items() if v is not None}
        try:
            config = AutoConfig.for_model(cfg.arch, vocab_size=len(tokenizer), **special, **cfg.config)
        except ValueError as e:
            raise QgplmError(f"model.arch={cfg.arch!r}: {e}") from None
        model = AUTO_CLASSES[cfg.kind].from_config(config)
    check_compatible(model, tokenizer, max_positions)
    return model


def check_compatible(model: PreTrainedModel, tokenizer: Any, max_positions: int) -> None:
    """The model must cover the tokenizer's ids and the task's block size."""
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise QgplmError(f"tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocab}: "
                         f"use the model's own tokenizer (model.tokenizer=null) or a matching checkpoint")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and max_positions > limit:
        raise QgplmError(f"task.block_size={max_positions} exceeds the model's {limit} positions: "
                         f"set task.block_size<={limit}")


def save_model(model: PreTrainedModel, tokenizer: Any, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
