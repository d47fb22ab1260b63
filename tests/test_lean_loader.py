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


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_packed_codes_decode_any_row_range(bits):
    """PackedCodes' row blocks are the matching rows of the whole tensor's unpack_codes, for row
    widths whose rows do not start on a byte (3-bit codes, 13 per row)."""
    from qgplm.export.format.pack import PackedCodes, code_range, pack_codes, unpack_codes

    lo, hi = code_range(bits)
    codes = torch.randint(lo, hi + 1, (11, 13), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    pc = PackedCodes(packed, bits, [11, 13])
    assert torch.equal(pc.full().long(), codes)
    assert torch.equal(unpack_codes(packed, bits, codes.numel()).view(11, 13), pc.full())
    for start, stop in ((0, 11), (0, 1), (3, 4), (5, 11), (7, 9), (10, 11), (4, 4)):
        assert torch.equal(pc[start:stop].long(), codes[start:stop]), (start, stop)
    with pytest.raises(QgplmError, match="corrupt"):
        PackedCodes(packed[:-1], bits, [11, 13])


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_dequantize_rows_is_bit_identical(per_row, transposed):
    """Built a few rows at a time into the final layout, the weight equals codes.to(float) * step
    (then transposed) bit for bit."""
    from qgplm.export.format.pack import PackedCodes, pack_codes

    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-2, 2, (37, 24), generator=g)
    step = torch.rand(37, 1, generator=g) * 0.1 if per_row else torch.tensor(0.0371)
    pc = PackedCodes(pack_codes(codes, 2), 2, [37, 24])
    want = L.dequantize(codes.to(torch.int8), step)
    want = want.t().contiguous() if transposed else want
    for block in (None, 8, 5):
        got = L.dequantize_rows(pc, step, transposed, block_rows=block)
        assert got.is_contiguous() and got.shape == want.shape
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), block


class WrittenTensors(TorchDispatchMode):
    """The largest element count of any tensor an op writes, per dtype (allocations by `empty` and
    views excluded, as in MaterialisedFloats)."""

    def __init__(self):
        super().__init__()
        self.largest: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        view = not schema.is_mutable and any(r.alias_info is not None for r in schema.returns)
        if str(func.name()).removeprefix("aten::") not in _EMPTY and not view:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    self.largest[t.dtype] = max(self.largest.get(t.dtype, 0), t.numel())
        return out


@pytest.mark.parametrize("mode", ["dequantize", "lowbit"])
def test_tables_are_decoded_a_block_of_rows_at_a_time(exports, mode, monkeypatch):
    """With blocks smaller than the largest table (the tied embedding), no op ever writes the whole
    table's codes (int8 / int16) nor a whole float copy of it in the dequantize and lowbit modes,
    and the logits are unchanged (dequantize mode: the student's, bit for bit)."""
    import qgplm.export.format.pack as pack
    import qgplm.export.runtimes.lowbit as lowbit

    d, s = exports["gpt2"]
    _, manifest = read_manifest(d)
    table = max(e["shape"][0] * e["shape"][1] for e in manifest["packed"].values())
    want = logits(load_quantized(d, mode), "gpt2", IDS)
    monkeypatch.setattr(pack, "_CHUNK", 64)
    monkeypatch.setattr(lowbit, "_ROWS", 8)
    with WrittenTensors() as seen:
        model = load_quantized(d, mode)
    for dtype in (torch.int8, torch.int16, torch.float32):
        assert seen.largest.get(dtype, 0) < table, (dtype, seen.largest, table)
    assert torch.equal(logits(model, "gpt2", IDS), want)
    if mode == "dequantize":
        assert torch.equal(want, logits(s, "gpt2", IDS))
