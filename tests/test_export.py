"""Packed export: bit packing, exactness of the loaded model, byte-identical re-export,
checksum refusal, int8 inference, CLI export + generate."""

from __future__ import annotations

import copy
import filecmp
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

import qgplm
from qgplm.errors import QgplmError
from qgplm.export import export_model, load_export_tokenizer, load_quantized
from qgplm.export.format.manifest import MANIFEST, WEIGHTS
from qgplm.export.format.pack import code_range, pack_codes, packed_nbytes, unpack_codes
from qgplm.export.runtimes.int8 import KERNELS, Int8Embedding, Int8Linear
from qgplm.models.loading import load_tokenizer
from qgplm.quant import ActivationQuantizer, QuantConfig, initialize_quantizers, quantize_model, quantized_modules
from qgplm.quant.api import oriented_weight
from tests.conftest import ROOT, SHARED_DATA, TINY, run_cli

VOCAB = 101


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("bits, codes, expected", [
    # unsigned u = c + 2^(b-1); little-endian bit stream, first code in the low bits
    (2, [-1, 0, 1, -2], [0b00_11_10_01]),                  # u = 1,2,3,0 -> 1 + 2<<2 + 3<<4 + 0<<6 = 57
    (2, [1, 1, 1, 1, -1], [0xFF, 0x01]),                  # 5 codes -> 2 bytes, last one zero-padded
    (3, [-4, 3, 0], [56, 1]),                              # u = 0,7,4: 7<<3 = 56; 4<<6 spills bit 8 -> byte 1
    (4, [-8, 7, 0], [0xF0, 0x08]),                         # u = 0,15,8
    (8, [-128, 0, 127], [0, 128, 255]),
])
def test_pack_hand_computed(bits, codes, expected):
    packed = pack_codes(torch.tensor(codes), bits)
    assert packed.dtype == torch.uint8 and packed.tolist() == expected
    assert unpack_codes(packed, bits, len(codes)).tolist() == codes


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_round_trip(bits):
    lo, hi = code_range(bits)
    codes = torch.randint(lo, hi + 1, (7, 13), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.numel() == packed_nbytes(codes.numel(), bits) == math.ceil(91 * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, codes.numel()).view(7, 13).long(), codes)


def test_pack_refuses_out_of_range_and_bad_sizes():
    with pytest.raises(QgplmError, match="outside the 2-bit range"):
        pack_codes(torch.tensor([2]), 2)
    with pytest.raises(QgplmError, match="export the model again"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 2, 20)


# ---------------------------------------------------------------- models


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


def tiny_bart(vocab: int = VOCAB) -> BartForConditionalGeneration:
    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=vocab, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)).eval()


MODELS = {"gpt2": tiny_gpt2, "bart": tiny_bart}


def student(arch: str, bits: int, **kw) -> torch.nn.Module:
    m = quantize_model(MODELS[arch](), QuantConfig(weight_bits=bits, embedding_bits=bits, **kw))
    initialize_quantizers(m)
    with torch.no_grad():  # move the scales off their init values, as training would
        for name, p in m.named_parameters():
            if name.endswith("gamma"):
                p.mul_(1.1)
    return m.eval()


def logits(model: torch.nn.Module, arch: str, ids: torch.Tensor) -> torch.Tensor:
    kw = {"decoder_input_ids": ids[:, :9]} if arch == "bart" else {}
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


IDS = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequantize_mode_is_bit_exact(tmp_path, arch, bits):
    s = student(arch, bits)
    export_model(s, tmp_path / "e")
    loaded = qgplm.load_quantized(tmp_path / "e")
    # every weight equals what the student's quantizer produces, bit for bit
    lmods = dict(quantized_modules(loaded))
    for name, mod in quantized_modules(s):
        with torch.no_grad():
            assert torch.equal(oriented_weight(lmods[name]), mod.weight_quantizer(oriented_weight(mod))), name
    assert torch.equal(logits(loaded, arch, IDS), logits(s, arch, IDS))


@pytest.mark.parametrize("quantizer", ["pact", "lsq", "laq", "twn", "minmax", "quantgpt_pact_grad"])
def test_baseline_quantizers_export_exactly(tmp_path, quantizer):
    s = student("gpt2", 2, quantizer=quantizer)
    export_model(s, tmp_path / "e")
    manifest = json.loads((tmp_path / "e" / MANIFEST).read_text())
    assert manifest["quantizer"] == [quantizer]
    assert torch.equal(logits(load_quantized(tmp_path / "e"), "gpt2", IDS), logits(s, "gpt2", IDS))


@pytest.mark.parametrize("bits", [2, 4])
def test_full_grid_exports_exactly_in_both_modes(tmp_path, bits):
    """grid="full" codes reach -2^(b-1): packed as they are, dequantized bit for bit, int8 as well."""
    s = student("gpt2", bits, quantizer_kwargs={"grid": "full"})
    codes, _ = s.transformer.h[0].mlp.c_fc.weight_quantizer.codes(oriented_weight(s.transformer.h[0].mlp.c_fc))
    assert codes.min() == -(2 ** (bits - 1))  # the fourth level (2 bits) is in use
    export_model(s, tmp_path / "e")
    assert torch.equal(logits(load_quantized(tmp_path / "e"), "gpt2", IDS), logits(s, "gpt2", IDS))
    m8 = load_quantized(tmp_path / "e", mode="int8")
    torch.testing.assert_close(logits(m8, "gpt2", IDS), logits(s, "gpt2", IDS), atol=1e-4, rtol=1e-4)


def test_per_row_and_3_bits_exact(tmp_path):
    s = student("gpt2", 3, per_row=True)
    export_model(s, tmp_path / "e")
    entry = json.loads((tmp_path / "e" / MANIFEST).read_text())["packed"]["transformer.h.0.mlp.c_fc.weight"]
    assert entry["bits"] == 3 and entry["per_row"] and entry["transposed"] and entry["shape"] == [128, 32]
    assert torch.equal(logits(load_quantized(tmp_path / "e"), "gpt2", IDS), logits(s, "gpt2", IDS))


def test_bart_shared_embedding_stored_once(tmp_path):
    s = student("bart", 2)
    rep = export_model(s, tmp_path / "e")
    m = json.loads((tmp_path / "e" / MANIFEST).read_text())
    emb = [k for k, e in m["packed"].items() if "model.encoder.embed_tokens.weight" in e["aliases"]]
    assert len(emb) == 1
    tables = {"model.shared.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"}
    assert tables <= set(m["packed"][emb[0]]["aliases"])
    assert rep.codes_bytes == sum(packed_nbytes(math.prod(e["shape"]), e["bits"]) for e in m["packed"].values())
    assert m["bits"] == {"weight": [2], "embedding": [2]}
    assert "final_logits_bias" in m["fp"]


def test_post_training_export_of_a_plain_model(tmp_path):
    plain = tiny_gpt2()
    before = copy.deepcopy(plain.state_dict())
    export_model(plain, tmp_path / "e", weight_bits=4, embedding_bits=4)
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())  # input model untouched
    ref = quantize_model(copy.deepcopy(plain), QuantConfig(weight_bits=4, embedding_bits=4))
    initialize_quantizers(ref)
    assert torch.equal(logits(load_quantized(tmp_path / "e"), "gpt2", IDS), logits(ref.eval(), "gpt2", IDS))


# ---------------------------------------------------------------- files


def test_reexport_is_byte_identical(tmp_path):
    tok = load_tokenizer(str(SHARED_DATA / "gpt2-tokenizer"))
    export_model(student("gpt2", 2), tmp_path / "a", tok)
    export_model(load_quantized(tmp_path / "a"), tmp_path / "b", load_export_tokenizer(tmp_path / "a"))
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b")) and WEIGHTS in names and MANIFEST in names
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", names, shallow=False)
    assert mismatch == [] and errors == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "config"])
def test_tampered_export_is_refused(tmp_path, damage):
    export_model(student("gpt2", 2), tmp_path / "e")
    path = tmp_path / "e" / (WEIGHTS if damage != "config" else "config.json")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 10]
    elif damage == "flip":
        data[-5] ^= 0x01
    else:
        data = data.replace(b'"n_layer": 2', b'"n_layer": 3')
    path.write_bytes(bytes(data))
    with pytest.raises(QgplmError, match=f"checksum mismatch for .*{path.name}"):
        load_quantized(tmp_path / "e")


def test_missing_manifest_and_nonempty_out_dir(tmp_path):
    with pytest.raises(QgplmError, match="not a qgplm export"):
        load_quantized(tmp_path)
    (tmp_path / "x").write_text("x")
    with pytest.raises(QgplmError, match="not empty"):
        export_model(student("gpt2", 2), tmp_path)
    with pytest.raises(QgplmError, match="mode="):
        load_quantized(tmp_path, mode="int4")


def test_compact_options_shrink_and_stay_close(tmp_path):
    s = student("gpt2", 2)
    full = export_model(s, tmp_path / "a")
    compact = export_model(s, tmp_path / "b", position_bits=8, fp16=True)
    assert compact.file_bytes < full.file_bytes and compact.fp_bytes < full.fp_bytes
    m = json.loads((tmp_path / "b" / MANIFEST).read_text())
    assert m["packed"]["transformer.wpe.weight"]["bits"] == 8
    assert m["fp"]["transformer.ln_f.weight"]["dtype"] == "float32"
    torch.testing.assert_close(logits(load_quantized(tmp_path / "b"), "gpt2", IDS), logits(s, "gpt2", IDS),
                               atol=2e-2, rtol=0)


# ---------------------------------------------------------------- int8 inference


def _ppl(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids).loss.item())


def _cpu_has_vnni() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return True
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


@pytest.mark.parametrize("bits, symmetric", [(2, False), (8, False), (4, True)])
def test_int8_mode_matches_student(tmp_path, bits, symmetric):
    s = student("gpt2", bits, activation_symmetric=symmetric)
    export_model(s, tmp_path / "e")
    m8 = load_quantized(tmp_path / "e", mode="int8")
    kinds = {type(m) for m in m8.modules()}
    assert Int8Linear in kinds and Int8Embedding in kinds
    assert m8.lm_head.codes is m8.transformer.wte.codes  # tied head shares the int8 codes
    assert m8.lm_head.kernel == "int_mm" and m8.transformer.h[0].mlp.c_fc.kernel == "onednn"
    assert not hasattr(m8.transformer.h[0].mlp.c_fc, "codes")  # the prepacked copy only
    ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    # oneDNN's u8 x s8 GEMM on a CPU without VNNI (AVX2 only) sums pairs of products in int16 with
    # saturation (vpmaddubsw): 8-bit weight codes can overflow it (255 * 127 * 2 > 32767), 2-4-bit
    # codes cannot. There the 8-bit layer is only close to the student (measured: 4e-3 on logits).
    tol = 5e-3 if bits == 8 and not _cpu_has_vnni() else 1e-4
    torch.testing.assert_close(logits(m8, "gpt2", ids), logits(s, "gpt2", ids), atol=tol, rtol=tol)
    assert abs(_ppl(m8, ids) / _ppl(s, ids) - 1) < 0.01


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
def test_int8_linear_kernels_match_hand_computed(symmetric, per_row):
    """Both integer kernels against x_q @ (codes * step)^T + b computed in float64 by hand."""
    codes = torch.tensor([[1, -2, 0], [-1, 1, 1]], dtype=torch.int8)
    step = torch.tensor([[0.5], [0.25]]) if per_row else torch.tensor(0.5)
    bias = torch.tensor([0.1, -0.2])
    x = torch.tensor([[[0.3, -1.2, 2.0], [1.0, 0.0, -0.5]]])  # [1, 2, 3]
    if symmetric:  # step_x = max|x| / 127
        sx = 2.0 / 127
        xq = torch.round(x.double() / sx).clamp(-127, 127) * sx
    else:  # step_x = (max - min) / 255, zero = round(-min / step_x)
        sx = 3.2 / 255
        z = round(1.2 / sx)
        xq = (torch.round(x.double() / sx) + z).clamp(0, 255).sub(z) * sx
    w = codes.double() * step.double()
    expected = xq @ w.t() + bias.double()
    for kernel in KERNELS:
        lin = Int8Linear(codes, step.float(), bias, ActivationQuantizer(8, symmetric=symmetric), kernel)
        assert lin.kernel == kernel
        for reps in (1, 10):  # 2 rows and 20 rows: int_mm's two operand orders
            torch.testing.assert_close(lin(x.repeat(1, reps, 1)).double(), expected.repeat(1, reps, 1),
                                       atol=1e-6, rtol=1e-6)


def test_int8_mode_keeps_8bit_position_embeddings_as_codes(tmp_path):
    s = student("gpt2", 2)
    export_model(s, tmp_path / "e", position_bits=8, fp16=True)
    m8 = load_quantized(tmp_path / "e", mode="int8")
    wpe = m8.transformer.wpe
    assert isinstance(wpe, Int8Embedding) and wpe.codes.dtype == torch.int8
    assert wpe.step.shape == (wpe.num_embeddings, 1)
    ref = load_quantized(tmp_path / "e")  # dequantize mode: the same 8-bit positions as floats
    assert type(ref.transformer.wpe) is torch.nn.Embedding
    torch.testing.assert_close(logits(m8, "gpt2", IDS), logits(ref, "gpt2", IDS), atol=1e-4, rtol=1e-4)


def test_int8_bart_generates(tmp_path):
    s = student("bart", 2)
    export_model(s, tmp_path / "e")
    m8 = load_quantized(tmp_path / "e", mode="int8")
    torch.testing.assert_close(logits(m8, "bart", IDS), logits(s, "bart", IDS), atol=1e-4, rtol=1e-4)
    out = m8.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    ref = s.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 1 and torch.equal(out, ref)
    with pytest.raises(QgplmError, match="int8 mode"):
        export_model(m8, tmp_path / "again")


def test_generate_text_bart_summary(tmp_path):
    from qgplm.cli.generate import generate_text

    tok = load_tokenizer(str(SHARED_DATA / "bart-tokenizer"))
    export_model(tiny_bart(vocab=len(tok)), tmp_path / "e", tok, weight_bits=8, embedding_bits=8)
    m = load_quantized(tmp_path / "e")
    text = generate_text(m, load_export_tokenizer(tmp_path / "e"), "The cat sat on the mat.", 5)
    assert isinstance(text, str)


# ---------------------------------------------------------------- command line


def _py(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_cli_pipeline_export_and_generate(tmp_path):
    run = tmp_path / "run"
    proc = run_cli([*TINY, "bits=2", "generate_samples=0", f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "export" / MANIFEST).is_file()  # written by the pipeline hook
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["export"]["ratio"] > 1

    proc = _py(["qgplm.export", f"ckpt={run}", f"out={tmp_path / 'e'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "packed codes" in proc.stdout and "compression" in proc.stdout
    # the checkpoint rebuilds the same student the pipeline exported
    assert filecmp.cmp(run / "export" / WEIGHTS, tmp_path / "e" / WEIGHTS, shallow=False)

    for mode in ("int8", "lowbit"):
        proc = _py(["qgplm.generate", f"dir={tmp_path / 'e'}", "prompt=the", "max_new_tokens=5", f"mode={mode}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip()



def test_cli_argument_errors(tmp_path):
    from qgplm.cli.export import main

    with pytest.raises(QgplmError, match="ckpt=.* does not exist"):
        main([f"ckpt={tmp_path / 'nope'}", f"out={tmp_path / 'f'}"])
    with pytest.raises(QgplmError, match="missing out="):
        main([f"ckpt={tmp_path}"])
    with pytest.raises(QgplmError, match="unknown argument 'bits'"):
        main(["bits=2", f"out={tmp_path / 'f'}"])
    with pytest.raises(QgplmError, match="no .hydra/config.yaml"):
        main([f"ckpt={tmp_path}", f"out={tmp_path / 'f'}"])


@pytest.mark.slow
@pytest.mark.parametrize("arch, target", [("gpt2", 14.4), ("bart", 13.4)])
def test_full_size_w2e2_reaches_paper_compression(tmp_path, arch, target):
    """docs/method.md: GPT-2 small 474.7 -> 32.9 MiB (14.4x), BART-base 532.0 -> 39.6 MiB (13.4x) at W2E2;
    the compact options (8-bit positions, fp16 LayerNorm/bias) stay below 16x."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from size_export import build

    model = build(arch).eval()
    qc = QuantConfig(weight_bits=2, embedding_bits=2, quantizer_kwargs={"gamma_init": "fixed"})
    rep = export_model(model, tmp_path / "e", quant_config=qc)
    assert rep.ratio >= target, rep.table()
    compact = export_model(model, tmp_path / "c", quant_config=qc, position_bits=8, fp16=True)
    assert rep.ratio < compact.ratio < 16, compact.table()
