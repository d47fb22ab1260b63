"""`load_quantized(dir, mode)`: rebuild a ready Hugging Face model from an export.

mode="dequantize": float weights rebuilt from codes as `codes * step` (the same float op the
    student's quantizer runs, hence bit-identical weights), placed in the same quantized layers
    as the student, so activations are fake-quantized to 8 bits exactly as in training and the
    logits are identical. The layers' quantizers are `StoredScaleQuantizer`s: the weights are
    already on their grid, so forward uses them as they are, and `codes()` recovers the codes
    from the stored step (export -> load -> export is byte-identical).
mode="int8": linear layers hold int8 codes and run integer matmuls on 8-bit activations; the
    token embedding keeps int8 codes too (int8.py).
mode="lowbit": weight codes stay at their bit-width in memory; linear layers run on onnxruntime's
    MatMulNBits kernel, the token embedding unpacks only the rows it looks up (lowbit.py).
Every mode installs the student's token-mask hooks (qgplm.quant.token_mask): the `dequantize`
and `int8` activation ranges ignore padded positions exactly as in training (lowbit's kernel
quantizes each row on its own and needs no mask).
Checksums are verified before any tensor is read.

Memory: no mode ever holds the float model. The model is built with its parameters on the meta
device (skeleton.py), then filled tensor by tensor from the memory-mapped file (safetensors'
`safe_open`): FP tensors (LayerNorms, biases, position embeddings) are copied out, dequantize mode
rebuilds each float weight from its codes one at a time, a block of rows at a time straight into
the weight (`dequantize_rows`), lowbit packs each block of rows straight into its kernel's layout,
and int8 decodes each packed tensor only when its kernel layer is built, dropping the int8 codes as
soon as no layer holds them. So
the peak while loading stays close to the loaded model (experiments/bench_export.py --memory-only,
docs/deploy.md "Loading memory").
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import load
from torch import Tensor, nn
from transformers import AutoConfig

import qgplm.quant.attention  # noqa: F401  (registers the quantized attention implementation)
from qgplm.errors import QgplmError
from qgplm.export.format.manifest import WEIGHTS, read_manifest, verify_checksums
from qgplm.export.format.pack import PackedCodes
from qgplm.export.format.skeleton import check_materialised, parameters_on_meta
from qgplm.export.runtimes.heap import release_freed_heap
from qgplm.quant.api import IdentityQuantizer, quantize_attention_inputs
from qgplm.quant.modules import QuantConv1D, QuantEmbedding, QuantLinear
from qgplm.quant.quantizers import ActivationQuantizer, WeightQuantizer
from qgplm.quant.token_mask import install_token_mask_hooks
from qgplm.quant.walk import swap_modules

MODES = ("dequantize", "int8", "lowbit")


class StoredScaleQuantizer(WeightQuantizer):
    """The quantizer of a loaded export: a fixed step (per tensor or per row) and the bit-width.

    The layer's weight was rebuilt as codes * step, so it already is its own quantized value:
    forward returns it unchanged (no per-call cost), and codes() = round(w / step) recovers the
    stored codes exactly (|codes| <= 128, so the float division is off by far less than 0.5).
    Inference only: it has no learnable scale.
    """

    scheme = "stored"

    def __init__(self, bits: int, step: Tensor, source_scheme: str):
        super().__init__(bits, num_rows=step.shape[0] if step.dim() > 0 else None)
        self.source_scheme = source_scheme  # the student's quantizer kind, written again on re-export
        self.register_buffer("step", step.clone(), persistent=False)
        self.initialized.fill_(True)

    def quantize(self, w: Tensor) -> Tensor:
        return w

    def codes(self, w: Tensor) -> tuple[Tensor, Tensor]:
        return torch.round(w / self.step), self.step

    def initialize(self, w: Tensor) -> None:
        self.initialized.fill_(True)

    def scale_parameters(self) -> list[nn.Parameter]:
        return []


def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _build_empty(export_dir: Path, manifest: dict[str, Any]) -> nn.Module:
    """The model class built from config.json with every parameter on the meta device (no float
    weight allocated) and its buffers computed by its constructor, as in a normal build."""
    from qgplm.models.loading import CUSTOM_CODE, NO_REMOTE_CODE, custom_code_error

    try:
        config = AutoConfig.from_pretrained(export_dir, local_files_only=True, **NO_REMOTE_CODE)
    except ValueError as e:  # an auto_map to Python files in the dir: never imported
        if CUSTOM_CODE in str(e):
            raise custom_code_error("dir", str(export_dir)) from None
        raise QgplmError(f"cannot read {export_dir}/config.json ({str(e).splitlines()[0][:200]}): export the "
                         f"model again") from None
    cls = getattr(transformers, str(manifest["model_class"]), None)
    # only a model class is called: the manifest cannot name another transformers callable
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise QgplmError(f"{manifest['model_class']} is not a transformers model class here: install the "
                         f"transformers version the export was made with")
    with _no_init(), parameters_on_meta():
        model = cls(config)
    return model


@contextlib.contextmanager
def _open_weights(export_dir: Path) -> Iterator[Any]:
    """The export's safetensors file, memory-mapped: `f.get_tensor(key)` is a view of the mapping,
    so only the pages of the tensors read become resident, and only while a view lives (a tensor
    the model keeps must be copied out)."""
    try:
        with safe_open(str(export_dir / WEIGHTS), framework="pt") as f:
            yield _TensorFile(f)
    except SafetensorError as e:
        raise QgplmError(f"cannot read {export_dir / WEIGHTS} ({e}): export the model again") from None


class _TensorFile:
    """`tensors[key]` over a safetensors handle (the mapping `decode` reads), `in` as for a dict."""

    def __init__(self, handle: Any):
        self._handle = handle
        self._keys = set(handle.keys())

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._handle.get_tensor(key)


class _LazyCodes:
    """{packed key: (int8 codes, step)}, decoded from the file on first use and held only as long
    as a layer holds them (a weak reference): the kernel layers are built one by one, so the int8
    codes of the whole model never sit in memory together, while a table shared by several layers
    (a tied LM head and its embedding in int8 mode) is decoded once and stays one tensor.
    `rows(key)` gives the codes undecoded (PackedCodes), for consumers that take them a block of
    rows at a time (dequantize mode, the low-bit kernels)."""

    def __init__(self, tensors: _TensorFile, manifest: dict[str, Any], steps: dict[str, Tensor]):
        self._tensors, self._packed, self._steps = tensors, manifest["packed"], steps
        self._held: dict[str, weakref.ref] = {}

    def __getitem__(self, key: str) -> tuple[Tensor, Tensor]:
        ref = self._held.get(key)
        codes = None if ref is None else ref()
        if codes is None:
            codes = self.rows(key)[0].full()
            self._held[key] = weakref.ref(codes)
        return codes, self._steps[key]

    def rows(self, key: str) -> tuple[PackedCodes, Tensor]:
        return packed_codes(self._tensors, key, self._packed[key]), self._steps[key]

    def step(self, key: str) -> Tensor:
        return self._steps[key]


class _RowCodes(Mapping):
    """{packed key: (PackedCodes, step)} over a _LazyCodes: what the low-bit kernels take."""

    def __init__(self, codes_of: _LazyCodes):
        self._codes_of = codes_of

    def __getitem__(self, key: str) -> tuple[PackedCodes, Tensor]:
        return self._codes_of.rows(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._codes_of._packed)

    def __len__(self) -> int:
        return len(self._codes_of._packed)


def read_tensors(export_dir: Path) -> dict[str, Tensor]:
    """Owned copies, not views of a memory map: the tensors kept as they are (position embeddings,
    LayerNorms) would otherwise pin the whole file's pages, codes included, in the resident set."""
    try:
        return load((export_dir / WEIGHTS).read_bytes())
    except (SafetensorError, OSError) as e:
        raise QgplmError(f"cannot read {export_dir / WEIGHTS} ({e}): export the model again") from None


def _stored(tensors: Mapping[str, Tensor] | _TensorFile, key: str, part: str) -> Tensor:
    """The `codes` or `scale` tensor of the packed tensor `key`; one error line if the file lacks it."""
    name = f"{key}.{part}"
    if name not in tensors:
        raise QgplmError(f"{WEIGHTS} has no codes/scale for {key}: the export is corrupt, export it again")
    return tensors[name]


def packed_codes(tensors: Mapping[str, Tensor] | _TensorFile, key: str, entry: dict[str, Any]) -> PackedCodes:
    """The codes of one packed tensor, undecoded, in the quantizer's orientation."""
    return PackedCodes(_stored(tensors, key, "codes"), entry["bits"], entry["shape"])


def decode(tensors: dict[str, Tensor], key: str, entry: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(int8 codes in the quantizer's orientation, step) of one packed tensor."""
    return packed_codes(tensors, key, entry).full(), _stored(tensors, key, "scale")


def dequantize(codes: Tensor, step: Tensor) -> Tensor:
    """codes * step: the same float op as the quantizers' forward (`codes * (alpha / n)`),
    done in place on the converted codes (same IEEE products, one allocation)."""
    return codes.to(step.dtype).mul_(step)


def dequantize_rows(codes: PackedCodes, step: Tensor, transposed: bool = False,
                    block_rows: int | None = None) -> Tensor:
    """`dequantize(codes, step)` (then `.t().contiguous()` if `transposed`), built a block of rows
    at a time straight into the one float tensor returned: each block's int8 codes are converted
    into their place and multiplied there by their rows' step, the same IEEE products as the whole
    tensor's `codes.to(dtype).mul_(step)`. The float weight is the only large allocation: no int8
    copy of the whole tensor and no second float copy for the transposition, so loading leaves no
    heap holes the size of a weight behind (glibc would keep them resident)."""
    rows = codes.shape[0]
    if transposed:
        out = torch.empty(codes.shape[::-1], dtype=step.dtype)
        view = out.t()
    else:
        out = view = torch.empty(codes.shape, dtype=step.dtype)
    per_row = step.numel() > 1  # [rows, 1]: each block takes its own rows' steps
    block = block_rows or codes.block_rows()
    for start in range(0, rows, block):
        part = view[start:start + block]
        part.copy_(codes[start:start + block])
        part.mul_(step[start:start + block] if per_row else step)
    return out


def _int8_keys(manifest: dict[str, Any]) -> set[str]:
    """Packed tensors that every layer using them will hold as int8 codes in int8 mode (their float
    weights are never materialised); mirrors the skip rule of int8.convert_int8."""
    yes, no = set(), set()
    for entry in manifest["modules"].values():
        if entry["weight"] is not None:
            (yes if entry["type"] == "embedding" or entry["act"] is not None else no).add(entry["weight"])
    return yes - no


def _int8_lookup_tables(model: nn.Module, manifest: dict[str, Any]) -> dict[str, str]:
    """Packed tensors outside any quantized layer (position embeddings exported with
    `position_bits=8`) that int8 mode keeps as codes: module name -> key, for plain nn.Embedding
    modules only (a subclass with its own forward, like BART's learned positions, is dequantized)."""
    used = {e["weight"] for e in manifest["modules"].values()}
    out: dict[str, str] = {}
    for key, entry in manifest["packed"].items():
        if key in used or entry["transposed"]:
            continue
        names = [a.removesuffix(".weight") for a in entry["aliases"]]
        if all(a.endswith(".weight") for a in entry["aliases"]) and all(
                type(model.get_submodule(n)) is nn.Embedding for n in names):
            out.update(dict.fromkeys(names, key))
    return out


def _lowbit_keys(manifest: dict[str, Any]) -> set[str]:
    """Packed tensors that lowbit mode holds only in its kernels' form (every quantized layer is
    converted, with or without an 8-bit input)."""
    return {e["weight"] for e in manifest["modules"].values() if e["weight"] is not None}


def _kernel_held_keys(mode: str, manifest: dict[str, Any], tables: dict[str, str]) -> set[str]:
    """Packed tensors whose float weights `mode` never needs (its kernels hold the codes)."""
    if mode == "int8":
        return _int8_keys(manifest) | set(tables.values())
    if mode == "lowbit":
        from qgplm.export.runtimes.lowbit import onnxruntime_module

        onnxruntime_module()  # a missing onnxruntime is one line, before anything is built
        return _lowbit_keys(manifest) | set(tables.values())
    return set()


def _steps_of(tensors: _TensorFile, manifest: dict[str, Any]) -> dict[str, Tensor]:
    """{packed key: its step} (owned copies: a few floats per tensor, or one per row)."""
    steps = {}
    for key in manifest["packed"]:
        steps[key] = _stored(tensors, key, "scale").clone()
    return steps


def _state_dict_of(tensors: _TensorFile, manifest: dict[str, Any], skip: set[str],
                   codes_of: _LazyCodes) -> dict[str, Tensor]:
    """The model's state dict, every alias filled: packed weights dequantized one at a time,
    except `skip`ped ones, which get a meta placeholder (their kernel layer replaces them), and FP
    tensors copied out of the file's mapping."""
    state: dict[str, Tensor] = {}
    for key, entry in manifest["packed"].items():
        shape = entry["shape"][::-1] if entry["transposed"] else entry["shape"]
        if key in skip:  # the layer is replaced by a kernel one after loading
            w = torch.empty(shape, dtype=codes_of.step(key).dtype, device="meta")
        else:
            w = dequantize_rows(*codes_of.rows(key), transposed=entry["transposed"])
        for alias in entry["aliases"]:
            state[alias] = w
    for key, entry in manifest["fp"].items():
        if key not in tensors:
            raise QgplmError(f"{WEIGHTS} has no tensor {key}: the export is corrupt, export it again")
        t = tensors[key].to(getattr(torch, entry["dtype"]), copy=True)  # a copy: the view would pin the map
        for alias in entry["aliases"]:
            state[alias] = t
    return state


def _convert_to_kernels(model: nn.Module, mode: str, manifest: dict[str, Any],
                        codes_of: Any, tables: dict[str, str],
                        kernel_options: dict[str, Any]) -> None:
    from qgplm.export.runtimes.int8 import Int8Embedding, convert_int8

    if mode == "int8":
        convert_int8(model, codes_of)
    else:
        from qgplm.export.runtimes.lowbit import convert_lowbit

        bits_of = {key: entry["bits"] for key, entry in manifest["packed"].items()}
        # the low-bit kernels pack the codes a block of rows at a time: no whole int8 table
        rows = _RowCodes(codes_of) if isinstance(codes_of, _LazyCodes) else codes_of
        convert_lowbit(model, rows, bits_of, **kernel_options)
    for name, key in tables.items():
        model.set_submodule(name, Int8Embedding(*codes_of[key], model.get_submodule(name).padding_idx, None),
                            strict=True)


def load_quantized(export_dir: str | Path, mode: str = "dequantize", **kernel_options: Any) -> nn.Module:
    """A ready HF model (eval mode; `generate` works) from a qgplm export directory.

    kernel_options (mode="lowbit" only): block_size, accuracy_level, threads (lowbit.convert_lowbit).
    """
    if mode not in MODES:
        raise QgplmError(f"mode={mode!r} is not valid: choose one of {', '.join(MODES)}")
    if kernel_options and mode != "lowbit":
        raise QgplmError(f"{', '.join(kernel_options)} only apply to mode=lowbit")
    export_dir, manifest = read_manifest(export_dir)
    verify_checksums(export_dir, manifest)
    model = _build_empty(export_dir, manifest)  # parameters on meta: nothing allocated yet
    tables = _int8_lookup_tables(model, manifest) if mode in ("int8", "lowbit") else {}
    skip = _kernel_held_keys(mode, manifest, tables)
    with _open_weights(export_dir) as tensors:
        steps = _steps_of(tensors, manifest)
        codes_of = _LazyCodes(tensors, manifest, steps)
        state = _state_dict_of(tensors, manifest, skip, codes_of)
        try:
            # assign: the model's parameters become these tensors (no copy into the meta ones)
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise QgplmError(f"the export does not match {manifest['model_class']} built from its config.json "
                             f"({str(e).splitlines()[0]}): export the model again") from None
        del state
        model.tie_weights()
        _install_quant_layers(model, manifest, steps)
        install_token_mask_hooks(model)
        model.eval()
        if mode in ("int8", "lowbit"):
            _convert_to_kernels(model, mode, manifest, codes_of, tables, kernel_options)
    check_materialised(model, f"load_quantized(mode={mode!r})")
    release_freed_heap()
    return model


def _install_quant_layers(model: nn.Module, manifest: dict[str, Any], steps: dict[str, Tensor]) -> None:
    """Wrap the layers the student quantized, with its activation quantizers (exact forward)."""
    quantizers: dict[str, WeightQuantizer] = {}  # one per packed tensor: tied layers share it, as in the student

    def weight_quantizer(key: str | None) -> WeightQuantizer:
        if key is None:
            wq = IdentityQuantizer()
            wq.initialized.fill_(True)
            return wq
        if key not in quantizers:
            p = manifest["packed"][key]
            # the manifest's "method" is the quantizer's scheme (an on-disk name, fixed by format version 1)
            quantizers[key] = StoredScaleQuantizer(p["bits"], steps[key], p["method"])
            quantizers[key].export_key = key
        return quantizers[key]

    def rebuild(name: str, mod: nn.Module) -> nn.Module:
        entry = manifest["modules"][name]
        wq, act = weight_quantizer(entry["weight"]), entry["act"]
        aq = None if act is None else ActivationQuantizer.from_spec(act)
        if entry["type"] == "embedding":
            return QuantEmbedding.from_float(mod, wq)
        if entry["type"] == "conv1d":
            return QuantConv1D.from_float(mod, wq, aq)
        return QuantLinear.from_float(mod, wq, aq)

    swap_modules(model, lambda name, mod: name in manifest["modules"], rebuild)
    attn = manifest.get("attention_act")
    if attn:
        quantize_attention_inputs(model, attn["bits"], attn["symmetric"], attn.get("granularity", "tensor"))


def load_export_tokenizer(export_dir: str | Path) -> Any:
    """The tokenizer saved with the export (None if it was exported without one)."""
    from qgplm.models.loading import load_tokenizer

    export_dir, manifest = read_manifest(export_dir)
    if not manifest.get("tokenizer"):
        return None
    return load_tokenizer(str(export_dir), key="dir")
