"""load_quantized never holds the float model: it builds the model with meta parameters and fills it
layer by layer (qgplm/export/format/skeleton.py, loader.py). Checked here: no full-size float weight is
ever materialised in the int8 / lowbit modes, the skeleton allocates no parameter, and every mode's
logits equal those of the previous path (the whole model loaded first, every code decoded up front,
then converted) on GPT-2, BART and Llama, bit for bit."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from qgplm.errors import QgplmError
from qgplm.export import export_model, load_quantized
from qgplm.export import loader as L
from qgplm.export.format.manifest import read_manifest
from qgplm.export.format.skeleton import check_materialised, meta_tensors, parameters_on_meta
from qgplm.quant import QuantConfig, initialize_quantizers, quantize_model
from tests.test_export import IDS, VOCAB, logits, student

pytest.importorskip("onnxruntime")

_EMPTY = {"empty.memory_format", "empty_strided.default", "empty_like.default", "new_empty.default",
          "new_empty_strided.default"}


class MaterialisedFloats(TorchDispatchMode):
    """Every CPU floating tensor an op *writes* (allocations by `empty` are not written, so they
    never become resident), with the op's name, and the peak of such bytes alive at once."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[str, tuple[int, ...]]] = []
        self.live: dict[int, int] = {}  # storage pointer -> bytes
        self.refs: dict[int, int] = {}  # storage pointer -> tensor objects alive
        self.peak = 0

    def _gone(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            del self.refs[ptr]
            self.live.pop(ptr, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        if str(func.name()).removeprefix("aten::") in _EMPTY:
            return out
        if not schema.is_mutable and any(r.alias_info is not None for r in schema.returns):
            return out  # a view: it writes nothing (its base was counted when written)
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_floating_point() and t.numel():
                self.made.append((func.name(), tuple(t.shape)))
                ptr = t.untyped_storage().data_ptr()
                self.live[ptr] = t.untyped_storage().nbytes()
                self.refs[ptr] = self.refs.get(ptr, 0) + 1
                weakref.finalize(t, self._gone, ptr)
                self.peak = max(self.peak, sum(self.live.values()))
        return out


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)).eval()


def llama_student() -> nn.Module:
    m = quantize_model(tiny_llama(), QuantConfig(weight_bits=2, embedding_bits=2))
    initialize_quantizers(m)
    return m.eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lean")
    out = {}
    for arch, s in (("gpt2", student("gpt2", 2)), ("bart", student("bart", 2)), ("llama", llama_student())):
        export_model(s, tmp / arch)
        out[arch] = (tmp / arch, s)
    return out


def previous_path(export_dir, mode: str) -> nn.Module:
    """The loader as it was: the whole float model loaded first (dequantize mode), every packed
    tensor decoded up front, then converted to kernel layers."""
    model = load_quantized(export_dir, "dequantize")
    d, manifest = read_manifest(export_dir)
    tensors = L.read_tensors(d)
    codes_of = {k: L.decode(tensors, k, e) for k, e in manifest["packed"].items()}
    if mode != "dequantize":
        L._convert_to_kernels(model, mode, manifest, codes_of, L._int8_lookup_tables(model, manifest), {})
    return model


def arch_of(arch: str) -> str:
    return "bart" if arch == "bart" else "gpt2"  # logits(): BART gets decoder ids


@pytest.mark.parametrize("arch", ["gpt2", "bart", "llama"])
@pytest.mark.parametrize("mode", ["dequantize", "int8", "lowbit"])
def test_logits_equal_the_previous_loader(exports, arch, mode):
    d, s = exports[arch]
    got = load_quantized(d, mode)
    assert not meta_tensors(got)
    assert torch.equal(logits(got, arch_of(arch), IDS), logits(previous_path(d, mode), arch_of(arch), IDS))
    if mode == "dequantize":  # the fake-quant student itself, bit for bit
        assert torch.equal(logits(got, arch_of(arch), IDS), logits(s, arch_of(arch), IDS))


@pytest.mark.parametrize("arch", ["gpt2", "bart", "llama"])
def test_buffers_and_ties_as_in_a_normal_build(exports, arch):
    """Non-persistent buffers (Llama's rotary inv_freq) are computed by the constructor, not left
    empty; tied weights stay one tensor."""
    d, s = exports[arch]
    got = load_quantized(d, "dequantize")
    for name, buf in s.named_buffers():
        if "quantizer" not in name:
            assert torch.equal(got.get_buffer(name), buf), name
    emb, head = got.get_input_embeddings(), got.get_output_embeddings()
    assert head.weight is emb.weight


@pytest.mark.parametrize("arch", ["gpt2", "bart", "llama"])
@pytest.mark.parametrize("mode", ["int8", "lowbit"])
def test_kernel_modes_never_materialise_a_float_weight(exports, arch, mode):
    """No float tensor the size of a packed weight is ever written while loading, and the float
    bytes alive at once are the FP parts the model keeps (the float model would be 4x the codes)."""
    d, _ = exports[arch]
    _, manifest = read_manifest(d)
    packed = {e["shape"][0] * e["shape"][1] for e in manifest["packed"].values()}
    kept = {t.numel() for t in L.read_tensors(d).values()}
    suspects = packed - kept  # sizes that only a dequantized weight can have
    assert suspects
    kept_bytes = sum(4 * t.numel() for t in L.read_tensors(d).values() if t.is_floating_point())  # FP parts, scales
    with MaterialisedFloats() as seen:
        model = load_quantized(d, mode)
    assert not meta_tensors(model)
    big = [(op, shape) for op, shape in seen.made if torch.Size(shape).numel() in suspects]
    assert not big, big
    # alive at once: the FP tensors the model keeps, plus at most one weight-sized temporary
    assert seen.peak <= kept_bytes + 4 * max(packed), (seen.peak, kept_bytes)


def test_dequantize_mode_holds_one_float_model(exports):
    """Float weights are rebuilt one at a time: the peak of float bytes alive is the model's own
    plus a few tensors, not twice the model (as building it first and then loading would be)."""
    d, s = exports["gpt2"]
    model_bytes = sum(p.numel() * 4 for p in s.parameters() if p.is_floating_point())
    with MaterialisedFloats() as seen:
        load_quantized(d, "dequantize")
    assert seen.peak < 1.5 * model_bytes, (seen.peak, model_bytes)


def test_skeleton_allocates_no_parameter():
    with parameters_on_meta():
        m = tiny_llama()
    assert {n for n, _ in m.named_parameters(remove_duplicate=False)} == set(meta_tensors(m))
    assert all(b.device.type == "cpu" for b in m.buffers())  # rotary inv_freq, computed as usual
    ref = tiny_llama()
    for name, b in ref.named_buffers():
        assert torch.equal(m.get_buffer(name), b), name
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight  # ties made in __init__ kept
    assert nn.Module.register_parameter is torch.nn.modules.module.Module.register_parameter
    lin = nn.Linear(3, 3)  # outside the block: real again
    assert lin.weight.device.type == "cpu"


def test_leftover_meta_tensor_is_refused():
    with parameters_on_meta():
        m = nn.Linear(4, 4)
    with pytest.raises(QgplmError, match="not filled from the export.*weight"):
        check_materialised(m, "load")
