"""Low-bit inference (mode="lowbit"): MatMulNBits packing against hand-computed bytes,
the runtime's weights equal the student's quantized weights, codes held at their bit-width, GPT-2
and BART logits / perplexity / generation close to the fake-quant student, one-line errors."""

from __future__ import annotations

import sys

import pytest
import torch

from qgplm.errors import QgplmError
from qgplm.export import export_model, load_quantized
from qgplm.export.runtimes.lowbit import (
    LowBitEmbedding,
    LowBitLinear,
    _SessionFactory,
    kernel_bits,
    pack_rows,
    unpack_rows,
)
from qgplm.quant import quantized_modules
from qgplm.quant.api import oriented_weight
from tests.test_export import IDS, VOCAB, _ppl, logits, student

# ---------------------------------------------------------------- packing


def test_pack_rows_hand_computed():
    # 2 bits, block 16: u = code + 2, four codes a byte, first in the low bits; a row of 5 codes is
    # padded with the zero point u = 2 (dequantizes to 0) up to one block of 16 -> 4 bytes
    codes = torch.tensor([[-1, 0, 1, -2, 1]])
    b = pack_rows(codes, 2, 16)
    assert b.shape == (1, 1, 4)
    # [1, 2, 3, 0] -> 1 + 2<<2 + 3<<4 + 0<<6 = 57; [3, 2, 2, 2] -> 3 + 8 + 32 + 128 = 171; [2]*4 -> 170
    assert b[0, 0].tolist() == [57, 171, 170, 170]
    # 4 bits: u = code + 8, two a byte: [-8, 7] -> 0 + 15<<4 = 240; [0, pad] -> 8 + 8<<4 = 136
    assert pack_rows(torch.tensor([[-8, 7, 0]]), 4, 16)[0, 0, :2].tolist() == [240, 136]
    # 8 bits: u = code + 128
    assert pack_rows(torch.tensor([[-128, 0, 127]]), 8, 16)[0, 0, :3].tolist() == [0, 128, 255]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_rows_round_trip(bits):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = torch.randint(lo, hi + 1, (7, 45), generator=torch.Generator().manual_seed(bits))
    b = pack_rows(codes, bits, 32)
    assert b.shape == (7, 2, 32 * bits // 8)
    assert torch.equal(unpack_rows(b, bits, 45), codes.to(torch.int16))


def test_kernel_bits_and_refusals():
    assert [kernel_bits(b) for b in range(2, 9)] == [2, 4, 4, 8, 8, 8, 8]  # 3-bit codes are held as 4-bit
    with pytest.raises(QgplmError, match="out of the 2-bit range"):
        pack_rows(torch.tensor([[2]]), 2, 16)


# ---------------------------------------------------------------- the runtime's weights


@pytest.mark.parametrize("bits, codes_range, per_row", [(2, (-1, 1), False), (2, (-2, 1), True), (3, (-3, 3), False),
                                                        (4, (-8, 7), True), (8, (-127, 127), False)])
def test_runtime_weights_equal_the_students(bits, codes_range, per_row):
    """The kernel's dequantized weight, read back through an identity input on the exact fp32 path
    (accuracy_level=0: dequantize, then sgemm; the same B and scales as the fast int8 path), equals
    codes * step bit for bit: ternary and full-grid 2-bit codes, 3-bit held as 4-bit, per row."""
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(codes_range[0], codes_range[1] + 1, (24, 80), generator=g).to(torch.int8)
    step = (torch.rand(24, 1, generator=g) * 0.1 + 0.01) if per_row else torch.tensor(0.037)
    lin = LowBitLinear(codes, step, bits, None, _SessionFactory(1), block_size=32, accuracy_level=0)
    w_runtime = lin(torch.eye(80)).t()
    assert torch.equal(w_runtime, codes.float() * step)


def test_fast_kernel_is_close_to_float_matmul():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-2, 2, (96, 128), generator=g).to(torch.int8)
    step, bias = torch.tensor(0.02), torch.randn(96, generator=g)
    x = torch.randn(3, 5, 128, generator=g)
    lin = LowBitLinear(codes, step, 2, bias, _SessionFactory(1), block_size=64)
    ref = x @ (codes.float() * step).t() + bias
    out = lin(x)
    assert out.shape == (3, 5, 96)
    # int8 activations per block of 64: error well under 1% of the output scale
    assert (out - ref).abs().max() < 0.01 * ref.abs().max()


def test_embedding_lookups_equal_the_dequantized_table():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-1, 2, (50, 30), generator=g).to(torch.int8)  # 30 is not a multiple of 4
    for step in (torch.tensor(0.05), torch.rand(50, 1, generator=g)):
        emb = LowBitEmbedding(codes, step, 2, None, None)
        assert emb.packed.dtype == torch.uint8 and emb.packed.shape == (50, 8)  # 2 bits a code
        ids = torch.randint(0, 50, (3, 7), generator=g)
        assert torch.equal(emb(ids), torch.nn.functional.embedding(ids, codes.float() * step))
        assert torch.equal(emb.weight, codes.float() * step)


# ---------------------------------------------------------------- whole models


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
@pytest.mark.parametrize("bits, kw", [(2, {}), (2, {"quantizer_kwargs": {"grid": "full"}}), (3, {"per_row": True}),
                                      (4, {}), (8, {})])
def test_lowbit_mode_matches_the_student(tmp_path, arch, bits, kw):
    s = student(arch, bits, **kw)
    export_model(s, tmp_path / "e")
    m = load_quantized(tmp_path / "e", mode="lowbit")
    # every quantized layer runs on the kernel or holds packed codes; no float copy of a quantized weight
    kinds = {type(mod) for mod in m.modules()}
    assert LowBitLinear in kinds and LowBitEmbedding in kinds
    assert not dict(quantized_modules(m))
    a, b = logits(m, arch, IDS), logits(s, arch, IDS)
    assert (a - b).abs().max() < 0.03 * b.abs().max()
    if arch == "gpt2":
        ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
        assert abs(_ppl(m, ids) / _ppl(s, ids) - 1) < 0.01


def test_lowbit_tied_head_and_embedding_hold_2bit_codes(tmp_path):
    s = student("gpt2", 2)
    export_model(s, tmp_path / "e")
    m = load_quantized(tmp_path / "e", mode="lowbit")
    wte, head = m.transformer.wte, m.lm_head
    assert isinstance(wte, LowBitEmbedding) and isinstance(head, LowBitLinear)
    assert wte.packed.numel() == VOCAB * 32 // 4  # 2 bits a weight
    floats = sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers() if b.is_floating_point())
    # what stays float: position embeddings, LayerNorms, biases and the steps (no quantized matrix)
    ref = load_quantized(tmp_path / "e")
    fp = sum(p.numel() for n, p in ref.named_parameters() if "wpe" in n or "ln" in n or n.endswith("bias"))
    assert floats <= fp + VOCAB + 64
    # the lookup equals the student's quantized table
    wq = s.transformer.wte.weight_quantizer(oriented_weight(s.transformer.wte))
    with torch.no_grad():
        assert torch.equal(wte(IDS), torch.nn.functional.embedding(IDS, wq))


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_lowbit_generates(tmp_path, arch):
    s = student(arch, 2)
    export_model(s, tmp_path / "e")
    m = load_quantized(tmp_path / "e", mode="lowbit")
    out = m.generate(IDS[:1, :6], max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape[1] >= 5
    # greedy steps with the cache equal a full forward's argmax (the kernel is deterministic)
    if arch == "gpt2":
        with torch.no_grad():
            full = m(input_ids=out[:, :-1]).logits.argmax(-1)
        assert torch.equal(full[0, 5:], out[0, 6:])


def test_lowbit_other_causal_lm(tmp_path):
    """Any HF causal LM qgplm quantizes (here OPT, nn.Linear layers, untied positions)."""
    from transformers import OPTConfig, OPTForCausalLM

    from qgplm.quant import QuantConfig, initialize_quantizers, quantize_model

    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                   num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32)).eval()
    q = quantize_model(opt, QuantConfig(weight_bits=2, embedding_bits=2))
    initialize_quantizers(q)
    export_model(q.eval(), tmp_path / "e")
    m = load_quantized(tmp_path / "e", mode="lowbit")
    a, b = logits(m, "gpt2", IDS), logits(q, "gpt2", IDS)
    assert (a - b).abs().max() < 0.03 * b.abs().max()


# ---------------------------------------------------------------- errors


def test_lowbit_errors(tmp_path, monkeypatch):
    s = student("gpt2", 2)
    export_model(s, tmp_path / "e")
    with pytest.raises(QgplmError, match="block_size=48 is not valid: use a power of 2"):
        load_quantized(tmp_path / "e", mode="lowbit", block_size=48)
    with pytest.raises(QgplmError, match="only apply to mode=lowbit"):
        load_quantized(tmp_path / "e", mode="int8", block_size=64)
    with pytest.raises(QgplmError, match="choose one of dequantize, int8, lowbit"):
        load_quantized(tmp_path / "e", mode="int4")
    m = load_quantized(tmp_path / "e", mode="lowbit")
    with pytest.raises(QgplmError, match="lowbit mode"):
        export_model(m, tmp_path / "again")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(QgplmError, match=r"mode=lowbit needs the onnxruntime package: pip install 'qgplm\[onnx\]'"):
        load_quantized(tmp_path / "e", mode="lowbit")


def test_cli_generate_lowbit(tmp_path):
    """(A real generation through the CLI: tests/test_export.py::test_cli_pipeline_export_and_generate.)"""
    from tests.test_export import _py

    export_model(student("gpt2", 2), tmp_path / "e")
    proc = _py(["qgplm.generate", f"dir={tmp_path / 'e'}", "prompt=the", "mode=lowbit"])
    assert proc.returncode == 2 and "exported without a tokenizer" in proc.stderr  # checked after loading
    proc = _py(["qgplm.generate", f"dir={tmp_path / 'e'}", "prompt=the", "mode=int8", "block_size=64"])
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "only applies to mode=lowbit" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bart_embeddings_share_one_packed_table(tmp_path):
    """shared / encoder.embed_tokens / decoder.embed_tokens hold the same codes: one table in memory."""
    s = student("bart", 2)
    export_model(s, tmp_path / "e")
    m = load_quantized(tmp_path / "e", mode="lowbit")
    tables = {m.model.shared.packed.data_ptr(), m.model.encoder.embed_tokens.packed.data_ptr(),
              m.model.decoder.embed_tokens.packed.data_ptr()}
    assert len(tables) == 1
    a, b = logits(m, "bart", IDS), logits(s, "bart", IDS)
    assert (a - b).abs().max() < 0.03 * b.abs().max()
