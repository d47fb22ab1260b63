"""`quantize_model(model, config)`: swap a Hugging Face LM's layers for quantized ones, in place.

Module selection is by type, so it works on any model built from nn.Linear, GPT-2's Conv1D and
nn.Embedding (GPT-2, BART, OPT, Llama-style ...):
- the token (input) embedding, every embedding sharing its weight (BART's encoder/decoder
  embed_tokens) and an untied decoder token embedding get `embedding_bits`, with one quantizer
  per distinct weight Parameter (tied tables share one quantizer, hence one learnt scale);
- an LM head tied to it reuses the embedding's weight *and its quantizer*, so the head computes
  with the same quantized table (as in the paper, docs/method.md); an untied head gets `embedding_bits` too;
- every other nn.Linear / Conv1D gets `weight_bits`;
- position embeddings, LayerNorm and biases are never touched.
With activation bits, the model gets the token-mask hooks of qgplm.quant.token_mask: every 8-bit
activation range is taken over real tokens only, never over padding.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from qgplm.errors import QgplmError
from qgplm.quant.modules import QUANT_MODULES, QuantConv1D, QuantEmbedding, QuantLinear
from qgplm.quant.quantizers import ActivationQuantizer, WeightQuantizer
from qgplm.quant.recipe import QuantConfig
from qgplm.quant.registry import quantizer_kind
from qgplm.quant.token_mask import install_token_mask_hooks
from qgplm.quant.walk import swap_modules


class IdentityQuantizer(WeightQuantizer):
    """Keeps a weight in full precision inside a quantized layer (weights FP, activations quantized)."""

    scheme = "identity"

    def __init__(self):
        super().__init__(bits=32)

    def quantize(self, w: Tensor) -> Tensor:
        return w

    def initialize(self, w: Tensor) -> None:
        self.initialized.fill_(True)


def _selected(name: str, config: QuantConfig) -> bool:
    if config.include and not any(re.search(p, name) for p in config.include):
        return False
    return not any(re.search(p, name) for p in config.exclude)


def _make_weight_quantizer(config: QuantConfig, bits: int | None, weight_rows: int) -> WeightQuantizer:
    if bits is None:
        return IdentityQuantizer()
    cls = quantizer_kind(config.quantizer).factory
    return cls(bits, num_rows=weight_rows if config.per_row else None, **config.quantizer_kwargs)


def _make_act_quantizer(config: QuantConfig) -> ActivationQuantizer | None:
    if config.activation_bits is None:
        return None
    return ActivationQuantizer(config.activation_bits, symmetric=config.activation_symmetric,
                               granularity=config.activation_granularity)


def _token_embedding_weights(model: nn.Module) -> set[int]:
    """ids of the token-embedding Parameters: the model's input embedding and, for an
    encoder-decoder whose encoder / decoder have their own (untied) tables, theirs."""
    out = set()
    owners = [model] + [getattr(model, f, lambda: None)() for f in ("get_encoder", "get_decoder")]
    for owner in owners:
        get_in = getattr(owner, "get_input_embeddings", None) if owner is not None else None
        try:
            emb = get_in() if get_in else None
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Embedding):
            out.add(id(emb.weight))
    return out


class _QuantizedLayerFactory:
    """The replace function of `quantize_model`: a quantized layer for each float layer it is offered.

    Token-embedding tables get `embedding_bits` with one quantizer per distinct weight Parameter,
    built on first use: modules sharing a table (BART's shared / encoder / decoder embed_tokens)
    and an LM head tied to it share that quantizer, hence one learnt scale, whichever the walk
    meets first; an untied head gets `embedding_bits` of its own; every other Linear / Conv1D
    gets `weight_bits`."""

    def __init__(self, model: nn.Module, config: QuantConfig):
        self.config = config
        self.token_weights = _token_embedding_weights(model)
        get_out = getattr(model, "get_output_embeddings", None)
        self.head = get_out() if get_out else None
        self.table_quantizers: dict[int, WeightQuantizer] = {}

    def table_quantizer(self, weight: Tensor, rows: int) -> WeightQuantizer:
        wq = self.table_quantizers.get(id(weight))
        if wq is None:
            wq = self.table_quantizers[id(weight)] = _make_weight_quantizer(self.config, self.config.embedding_bits,
                                                                            rows)
        else:
            wq.shared = True  # a second layer of the same table: one output per forward (WeightQuantizer.forward)
        return wq

    def __call__(self, name: str, mod: nn.Module) -> nn.Module | None:
        config = self.config
        if isinstance(mod, nn.Embedding) and id(mod.weight) in self.token_weights:
            if config.embedding_bits is None:
                return None
            return QuantEmbedding.from_float(mod, self.table_quantizer(mod.weight, mod.num_embeddings))
        if mod is self.head and isinstance(mod, nn.Linear):
            wq = self.table_quantizer(mod.weight, mod.out_features)
            return QuantLinear.from_float(mod, wq, _make_act_quantizer(config))
        if isinstance(mod, nn.Linear):
            wq = _make_weight_quantizer(config, config.weight_bits, mod.out_features)
            return QuantLinear.from_float(mod, wq, _make_act_quantizer(config))
        if isinstance(mod, Conv1D):
            wq = _make_weight_quantizer(config, config.weight_bits, mod.nf)
            return QuantConv1D.from_float(mod, wq, _make_act_quantizer(config))
        return None


def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Swap quantizable layers of `model` in place and return it (torchao's `quantize_` style).

    A config with every bit-width None leaves the model untouched (plain distillation).
    """
    if any(isinstance(m, QUANT_MODULES) for m in model.modules()):
        raise QgplmError("model is already quantized: call quantize_model once, on a float model")
    if config.is_full_precision:
        return model
    factory = _QuantizedLayerFactory(model, config)
    swap_modules(model, lambda name, mod: _selected(name, config), factory)
    if any(q.shared for q in factory.table_quantizers.values()):
        install_shared_output_hooks(model)
    if config.quantize_attention and config.activation_bits is not None:
        quantize_attention_inputs(model, config.activation_bits, config.activation_symmetric,
                                  config.activation_granularity)
    if config.activation_bits is not None:
        install_token_mask_hooks(model)  # activation ranges over real tokens only
    return model


def _forget_shared_outputs(model: nn.Module, *_: object) -> None:
    for m in model.modules():
        if isinstance(m, WeightQuantizer) and m.shared:
            m.forget_output()


def install_shared_output_hooks(model: nn.Module) -> None:
    """Scope a shared quantizer's output (`WeightQuantizer.forward`) to one forward of `model`: it is
    dropped before each forward and after it (also when the forward raises). Idempotent."""
    if getattr(model, "_qgplm_shared_output_hooks", False):
        return
    model.register_forward_pre_hook(_forget_shared_outputs)
    model.register_forward_hook(_forget_shared_outputs, always_call=True)
    model._qgplm_shared_output_hooks = True


def quantize_attention_inputs(model: nn.Module, bits: int, symmetric: bool, granularity: str = "tensor") -> None:
    """Give every attention module an 8-bit quantizer for its matmul inputs (qgplm.quant.attention);
    per token, a range is one head's query / key / value vector or one query's attention row."""
    from qgplm.quant.attention import IMPLEMENTATION, is_attention_module

    modules = [m for m in model.modules() if is_attention_module(m)]
    if not modules:
        raise QgplmError(f"quantize_attention: no attention module found in {type(model).__name__}: "
                         f"set method.quantize_attention=false")
    for m in modules:
        m.attn_act_quantizer = ActivationQuantizer(bits, symmetric=symmetric, granularity=granularity)
    model.set_attn_implementation(IMPLEMENTATION)


# torchao spelling
quantize_ = quantize_model


def weight_quantizers(model: nn.Module) -> Iterator[tuple[str, WeightQuantizer, Tensor]]:
    """(module name, quantizer, the weight it quantizes), once per distinct quantizer.

    The weight is oriented as the quantizer sees it ([out, in]); for Conv1D it is transposed.
    """
    seen: set[int] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, QUANT_MODULES) and id(mod.weight_quantizer) not in seen:
            seen.add(id(mod.weight_quantizer))
            yield name, mod.weight_quantizer, oriented_weight(mod)


def oriented_weight(mod: nn.Module) -> Tensor:
    """The weight as its quantizer sees it (Conv1D stores [in, out]; quantizers see [out, in])."""
    return mod.weight.t() if isinstance(mod, QuantConv1D) else mod.weight


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, mod in model.named_modules():
        if isinstance(mod, QUANT_MODULES):
            yield name, mod


def initialize_quantizers(model: nn.Module, force: bool = False) -> int:
    """Initialise every not-yet-initialised weight quantizer from its weight; returns how many."""
    count, seen = 0, set()
    for _, mod in quantized_modules(model):
        q = mod.weight_quantizer
        if id(q) in seen or (bool(q.initialized) and not force):
            continue
        seen.add(id(q))
        q.initialize(oriented_weight(mod).detach())
        count += 1
    return count


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every learnable quantizer scale (deduplicated), for the optimizer's scale group."""
    out, seen = [], set()
    for m in model.modules():
        if isinstance(m, WeightQuantizer):
            for p in m.scale_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def set_quantization_enabled(model: nn.Module, enabled: bool) -> None:
    for m in model.modules():
        if isinstance(m, (WeightQuantizer, ActivationQuantizer)):
            m.enabled = enabled


@contextlib.contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the quantized model as its float original (used by tests and for debugging)."""
    set_quantization_enabled(model, False)
    try:
        yield model
    finally:
        set_quantization_enabled(model, True)
