"""`export_model`: write a trained (or post-training quantized) model as packed integer codes.

What is stored, per tensor of the model's state dict (tied / shared tensors once, by storage):
- weights of quantized layers: their integer codes from the layer's own quantizer (`codes()`),
  packed densely (pack.py), plus the quantizer step (one per tensor, or one per row);
- everything else (position embeddings, LayerNorm, biases, BART's final_logits_bias) in FP32,
  or optionally position embeddings as 8-bit per-row codes and 1-D tensors in fp16;
- the quantized-module structure (which layers quantize their 8-bit input), so the loader
  rebuilds the student's forward exactly.
Before writing, every packed tensor is checked: codes * step must equal the quantizer's forward
output bit for bit, which is what makes the loaded model's logits identical to the student's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from qgplm.errors import QgplmError
from qgplm.export.format.manifest import MANIFEST, WEIGHTS, empty_out_dir, write_manifest
from qgplm.export.format.pack import pack_codes, packed_nbytes
from qgplm.export.format.report import ExportReport
from qgplm.quant.api import IdentityQuantizer, initialize_quantizers, oriented_weight, quantize_model
from qgplm.quant.modules import QUANT_MODULES, KernelLayer, QuantConv1D, QuantEmbedding, QuantLinear
from qgplm.quant.quantizers import ActivationQuantizer, WeightQuantizer
from qgplm.quant.recipe import QuantConfig
from qgplm.quant.registry import kind_of


def _is_quantizer(mod: nn.Module) -> bool:
    return isinstance(mod, (WeightQuantizer, ActivationQuantizer))


def _storage_key(t: Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _alias_groups(model: nn.Module) -> tuple[dict[str, list[str]], dict[str, Tensor]]:
    """State-dict keys grouped by storage (tied tensors together), quantizer state left out.
    Returns {first key: all keys} in state-dict order, and {first key: tensor}."""
    skip = tuple(f"{n}." for n, m in model.named_modules(remove_duplicate=False) if n and _is_quantizer(m))
    groups: dict[tuple, list[str]] = {}
    tensors: dict[tuple, Tensor] = {}
    for key, t in model.state_dict(keep_vars=False).items():
        if key.startswith(skip) or ".attn_act_quantizer." in key:
            continue
        sk = _storage_key(t)
        groups.setdefault(sk, []).append(key)
        tensors.setdefault(sk, t)
    return {g[0]: g for g in groups.values()}, {groups[sk][0]: t for sk, t in tensors.items()}


def _scheme(q: WeightQuantizer) -> str:
    """The quantizer kind a packed tensor records: a reloaded export's stored quantizer keeps its student's."""
    return getattr(q, "source_scheme", None) or q.scheme


@torch.no_grad()
def _quantizer_codes(name: str, mod: nn.Module) -> tuple[Tensor, Tensor]:
    q = mod.weight_quantizer
    if not q.enabled or q.mix < 1.0:
        raise QgplmError(f"{name}: its quantizer is disabled or still ramping in (mix={q.mix}): export after "
                         f"the scale warm-up has finished")
    if not bool(q.initialized):
        raise QgplmError(f"{name}: quantizer scale was never initialised: call initialize_quantizers(model) first")
    kind = kind_of(q)
    if kind is not None and kind.export == "none":
        raise QgplmError(f"{name}: quantizer {kind.name!r} has no integer codes, so it cannot be exported in "
                         f"packed form: keep the Lightning checkpoint instead")
    w = oriented_weight(mod).detach()
    codes, step = q.codes(w)
    if not torch.equal(codes * step, q(w)):
        raise QgplmError(f"{name}: quantizer {_scheme(q)!r} codes() * step differs from its forward: the export "
                         f"would not reproduce the student; fix that quantizer's codes()")
    return codes, step.detach().to(torch.float32).contiguous()


def _module_type(mod: nn.Module) -> str:
    return {QuantLinear: "linear", QuantConv1D: "conv1d", QuantEmbedding: "embedding"}[type(mod)]


def _prepare(model: nn.Module, config: QuantConfig) -> nn.Module:
    """A quantized model as is; a float model quantized post-training (a copy, scales initialised)."""
    kernel = next((m for m in model.modules() if isinstance(m, KernelLayer)), None)
    if kernel is not None:
        raise QgplmError(f"cannot export a model loaded in {kernel.mode} mode: load it with mode='dequantize' to "
                         f"export it")
    if any(isinstance(m, QUANT_MODULES) for m in model.modules()):
        return model
    if config.weight_bits is None and config.embedding_bits is None:
        raise QgplmError("nothing to export in packed form: set weight_bits or embedding_bits (2..8)")
    model = quantize_model(copy.deepcopy(model), config)
    initialize_quantizers(model)
    return model


def _on_cpu(model: nn.Module) -> nn.Module:
    """The model itself when it is on the CPU, else a CPU copy (the caller's stays on its GPU):
    packing goes through numpy and safetensors' files, and a student trained on a GPU is exported
    as it is. Tied weights stay tied (one Parameter, moved once)."""
    if all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()]):
        return model
    return copy.deepcopy(model).cpu()


@dataclass
class _Contents:
    """What an export writes, gathered step by step: the safetensors entries, the manifest's
    per-tensor and per-module records, and the byte counts of the report."""

    groups: dict[str, list[str]]  # first state-dict key -> every key sharing its storage
    tensors: dict[str, Tensor] = field(default_factory=dict)
    packed: dict[str, dict[str, Any]] = field(default_factory=dict)
    fp: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    bits: dict[str, set[int]] = field(default_factory=lambda: {"weight": set(), "embedding": set()})
    schemes: set[str] = field(default_factory=set)
    codes_bytes: int = 0
    scales_bytes: int = 0
    fp_bytes: int = 0
    fp32_bytes: int = 0
    weights: int = 0  # elements of every stored tensor
    quant_weights: int = 0  # elements of the packed ones

    def add_packed(self, key: str, codes: Tensor, step: Tensor, bits: int, **record: Any) -> None:
        self.tensors[f"{key}.codes"] = pack_codes(codes, bits)
        self.tensors[f"{key}.scale"] = step
        self.packed[key] = {"bits": bits, "shape": list(codes.shape), **record, "aliases": self.groups[key]}
        self.codes_bytes += packed_nbytes(codes.numel(), bits)
        self.scales_bytes += step.numel() * 4
        self.quant_weights += codes.numel()


def _exports_codes(q: WeightQuantizer) -> bool:
    """Whether a layer's weight is stored as codes: an FP weight (IdentityQuantizer, 32 bits) is not."""
    return not isinstance(q, IdentityQuantizer) and q.bits <= 8


def _pack_quantized_layers(model: nn.Module, key_of: dict[tuple, str], out: _Contents) -> None:
    """Record every quantized layer's structure and pack each quantized weight once (tied layers
    must agree on its codes)."""
    done: dict[str, tuple[Tensor, Tensor]] = {}
    in_emb = _in_emb(model)
    for name, mod in model.named_modules(remove_duplicate=False):
        if not isinstance(mod, QUANT_MODULES):
            continue
        key = key_of.get(_storage_key(mod.weight.detach()))
        if key is None:
            raise QgplmError(f"{name}.weight is not in the model's state dict: cannot export this model")
        aq, q = getattr(mod, "act_quantizer", None), mod.weight_quantizer
        quantized = _exports_codes(q)
        out.modules[name] = {"type": _module_type(mod), "weight": key if quantized else None,
                             "act": None if aq is None else aq.spec()}
        if not quantized:
            continue
        codes, step = _quantizer_codes(name, mod)
        if key in done:
            if not (torch.equal(done[key][0], codes) and torch.equal(done[key][1], step)):
                raise QgplmError(f"{name} shares its weight with another layer but quantizes it differently: "
                                 f"tie their quantizers before exporting")
            continue
        done[key] = (codes, step)
        out.bits["embedding" if isinstance(mod, QuantEmbedding) or mod.weight is in_emb else "weight"].add(q.bits)
        out.schemes.add(_scheme(q))
        # "method" is the scheme's on-disk key (format version 1 and the exports already written use it)
        out.add_packed(key, codes, step, q.bits, transposed=isinstance(mod, QuantConv1D), method=_scheme(q),
                       per_row=bool(q.per_row))


def _store_other_tensors(unique: dict[str, Tensor], positions: set[str], fp16: bool, out: _Contents) -> None:
    """Every tensor not packed yet: position tables as 8-bit per-row codes (`positions`), the rest
    in floating point (1-D ones in fp16 with `fp16`); counts the FP32 reference size of all."""
    from qgplm.quant.baselines import minmax_codes

    for key, t in unique.items():
        out.fp32_bytes += t.numel() * 4 if t.is_floating_point() else t.numel() * t.element_size()
        out.weights += t.numel()
        if key in out.packed:
            continue
        t = t.detach()
        if key in positions:
            codes, step = minmax_codes(t.float(), 8, per_row=True)
            out.add_packed(key, codes, step.float().contiguous(), 8, transposed=False, method="minmax", per_row=True)
            continue
        stored = t.half() if (fp16 and t.is_floating_point() and t.dim() <= 1) else t
        out.tensors[key] = stored.contiguous().clone()
        out.fp[key] = {"dtype": str(t.dtype).removeprefix("torch."), "aliases": out.groups[key]}
        out.fp_bytes += stored.numel() * stored.element_size()


def _write_files(model: nn.Module, out_dir: Path, tensors: dict[str, Tensor], tokenizer: Any) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "qgplm-export"})
    model.config.save_pretrained(out_dir)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def _manifest(model: nn.Module, contents: _Contents, report: ExportReport, options: dict[str, Any],
              tokenizer: Any) -> dict[str, Any]:
    attn = [m.attn_act_quantizer for m in model.modules() if hasattr(m, "attn_act_quantizer")]
    return {
        "model_class": type(model).__name__,
        "kind": "seq2seq" if getattr(model.config, "is_encoder_decoder", False) else "causal",
        "quantizer": sorted(contents.schemes),
        "bits": {k: sorted(v) for k, v in contents.bits.items()},
        "options": options,
        "packed": contents.packed, "fp": contents.fp, "modules": contents.modules,
        "attention_act": attn[0].spec() if attn else None,
        "size": {k: v for k, v in report.as_dict().items() if k != "out_dir"},
        "tokenizer": tokenizer is not None,
    }


def export_model(model: nn.Module, out_dir: str | Path, tokenizer: Any = None, *, weight_bits: int | None = 2,
                 embedding_bits: int | None = 2, activation_bits: int | None = 8, quantizer: str = "quantgpt",
                 per_row: bool = False, quant_config: QuantConfig | None = None, position_bits: int | None = None,
                 fp16: bool = False) -> ExportReport:
    """Write `model` as a self-describing packed directory and return its size breakdown.

    A model already quantized by `quantize_model` (a trained student) is exported as is: the
    bit-width arguments are ignored. A plain HF model is quantized post-training first with
    `quant_config` (or one built from the arguments), its scales set by the quantizer's
    initialisation. `position_bits=8` stores position embeddings as 8-bit per-row codes and
    `fp16=True` stores 1-D FP tensors (LayerNorm, biases) in half precision; both make the
    loaded model differ (slightly) from the student, so they are off by default.
    """
    if position_bits not in (None, 8):
        raise QgplmError(f"position_bits={position_bits}: use 8 or None (FP32)")
    out = empty_out_dir(out_dir)
    config = quant_config or QuantConfig(weight_bits=weight_bits, embedding_bits=embedding_bits,
                                         activation_bits=activation_bits, quantizer=quantizer, per_row=per_row)
    model = _on_cpu(_prepare(model, config))
    groups, unique = _alias_groups(model)
    key_of = {_storage_key(t): k for k, t in unique.items()}
    contents = _Contents(groups)
    _pack_quantized_layers(model, key_of, contents)
    _store_other_tensors(unique, _position_keys(model, key_of) if position_bits else set(), fp16, contents)
    _write_files(model, out, contents.tensors, tokenizer)
    report = ExportReport(str(out), "qgplm", {WEIGHTS: (out / WEIGHTS).stat().st_size}, contents.fp32_bytes,
                          weights=contents.weights, quant_weights=contents.quant_weights,
                          quant_bytes=contents.codes_bytes + contents.scales_bytes,
                          codes_bytes=contents.codes_bytes, scales_bytes=contents.scales_bytes,
                          fp_bytes=contents.fp_bytes)
    options = {"position_bits": position_bits, "fp16": fp16}
    write_manifest(out, _manifest(model, contents, report, options, tokenizer))
    return report


def _in_emb(model: nn.Module) -> Tensor | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get else None
    return None if emb is None else emb.weight


def _position_keys(model: nn.Module, key_of: dict[tuple, str]) -> set[str]:
    """State-dict keys of float (unquantized) embedding tables: GPT-2's wpe, BART's embed_positions."""
    out = set()
    for mod in model.modules():
        if isinstance(mod, nn.Embedding) and not isinstance(mod, QuantEmbedding):
            key = key_of.get(_storage_key(mod.weight.detach()))
            if key is not None:
                out.add(key)
    return out


__all__ = ["MANIFEST", "export_model"]
