"""format=gguf (qgplm/export/converters/gguf.py): the student's codes in llama.cpp's TQ2_0 / Q4_0 / Q8_0 blocks,
read back with gguf's reference dequantization, and run by llama.cpp (llama-cpp-python)."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from qgplm.errors import QgplmError
from qgplm.export import export_model
from qgplm.export.converters.gguf import (
    GGUF_FILE,
    encode_q4_0,
    encode_q8_0,
    encode_tq2_0,
    export_gguf,
    ggml_type,
)
from qgplm.export.converters.gguf_arch import GPT2
from qgplm.export.format.manifest import read_manifest
from qgplm.export.loader import decode, read_tensors
from qgplm.export.runtimes.llamacpp import LlamaCppCausalLM, LlamaCppLM
from qgplm.quant import QuantConfig, quantize_model
from qgplm.quant.api import initialize_quantizers
from tests.conftest import SHARED_DATA
from tests.test_export import _py, tiny_bart

VOCAB = 300
IDS = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))


def gpt2_256(vocab: int = VOCAB, layers: int = 2, **kw) -> GPT2LMHeadModel:
    """The smallest GPT-2 whose rows fit TQ2_0's 256-weight blocks."""
    torch.manual_seed(0)
    kw = {"bos_token_id": 0, "eos_token_id": 0, **kw}
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=256, n_head=4, vocab_size=vocab, n_positions=64,
                                      **kw)).eval()


def student(bits: int = 2, model=None, **kw) -> torch.nn.Module:
    m = quantize_model(model if model is not None else gpt2_256(), QuantConfig(weight_bits=bits, embedding_bits=bits,
                                                                                **kw))
    initialize_quantizers(m)
    with torch.no_grad():  # scales off their init values, as training would move them
        for name, p in m.named_parameters():
            if name.endswith("gamma"):
                p.mul_(1.1)
    return m.eval()


def exported(tmp_path, s, tokenizer=None):
    export_model(s, tmp_path / "e", tokenizer)
    report = export_gguf(tmp_path / "e", tmp_path / "g")
    return report, tmp_path / "g"


# ---------------------------------------------------------------- block layouts, by hand


def _fp16_bytes(x: float) -> list[int]:
    return list(np.array([x], dtype=np.float16).view(np.uint8))


def test_tq2_0_ternary_hand_computed():
    codes = torch.zeros(1, 256, dtype=torch.int8)
    codes[0, 0], codes[0, 32], codes[0, 128], codes[0, 255] = 1, -1, 1, -1
    b = encode_tq2_0(codes, torch.tensor(0.5))
    assert b.shape == (1, 66)
    # q = c + 1; value v = c*128 + l*32 + m in bits 2l of byte c*32 + m; all-zero codes: q = 1 -> 0x55
    expect = np.full(64, 0x55, np.uint8)
    expect[0] = 0b01_01_00_10  # v=0: q=2 (bits 0-1), v=32: q=0 (bits 2-3)
    expect[32] = 0b01_01_01_10  # v=128: q=2
    expect[63] = 0b00_01_01_01  # v=255: l=3, m=31 -> bits 6-7 of byte 63, q=0
    assert list(b[0, :64]) == list(expect) and list(b[0, 64:]) == _fp16_bytes(0.5)


def test_tq2_0_full_grid_negates_the_scale():
    codes = torch.zeros(1, 256, dtype=torch.int8)
    codes[0, 0], codes[0, 1] = -2, 1
    b = encode_tq2_0(codes, torch.tensor(0.5))
    # q = 1 - c: -2 -> 3, 1 -> 0, 0 -> 1; d = -0.5, so (q - 1) * d = c * 0.5
    assert b[0, 0] == 0b01_01_01_11 and b[0, 1] == 0b01_01_01_00 and list(b[0, 64:]) == _fp16_bytes(-0.5)
    deq = gguf.quants.dequantize(b, gguf.GGMLQuantizationType.TQ2_0)
    assert torch.equal(torch.from_numpy(deq).reshape(1, 256), codes.float() * 0.5)


def test_q4_0_and_q8_0_hand_computed():
    c4 = torch.zeros(1, 32, dtype=torch.int8)
    c4[0, 0], c4[0, 16] = -8, 7
    b4 = encode_q4_0(c4, torch.tensor(0.25))
    # d first, then qs[j] = q[j] | q[j + 16] << 4 with q = c + 8
    assert list(b4[0, :2]) == _fp16_bytes(0.25) and b4[0, 2] == 0xF0 and list(b4[0, 3:]) == [0x88] * 15
    c8 = torch.zeros(1, 32, dtype=torch.int8)
    c8[0, 0], c8[0, 1] = -128, 127
    b8 = encode_q8_0(c8, torch.tensor(1.0))
    assert list(b8[0, :2]) == _fp16_bytes(1.0) and list(b8[0, 2:4]) == [0x80, 0x7F] and b8.shape == (1, 34)


@pytest.mark.parametrize("bits, k, expected", [(2, 256, "TQ2_0"), (2, 768, "TQ2_0"), (2, 64, "Q4_0"), (3, 256, "Q4_0"),
                                               (4, 32, "Q4_0"), (6, 64, "Q8_0"), (8, 3072, "Q8_0")])
def test_ggml_type_choice(bits, k, expected):
    assert ggml_type(bits, k, "w", "q4_0")[0] == expected


def test_rows_that_fit_no_block_are_one_line():
    with pytest.raises(QgplmError, match="multiple of 32 is needed"):
        ggml_type(2, 40, "w")


def test_gpt2_names():
    assert GPT2.gguf_name("transformer.h.3.attn.c_attn.weight") == "blk.3.attn_qkv.weight"
    assert GPT2.gguf_name("transformer.h.0.mlp.c_proj.bias") == "blk.0.ffn_down.bias"
    assert GPT2.gguf_name("transformer.h.1.ln_2.weight") == "blk.1.ffn_norm.weight"
    assert GPT2.gguf_name("transformer.wte.weight") == "token_embd.weight"
    assert GPT2.gguf_name("transformer.h.0.attn.bias") is None


# ---------------------------------------------------------------- the file holds the student's codes


@pytest.mark.parametrize("bits, kw, qtype", [(2, {}, "TQ2_0"), (2, {"quantizer_kwargs": {"grid": "full"}}, "TQ2_0"),
                                             (2, {"per_row": True}, "TQ2_0"), (3, {}, "Q4_0"), (4, {}, "Q4_0"),
                                             (8, {}, "Q8_0")])
def test_dequantized_file_weights_equal_the_codes(tmp_path, bits, kw, qtype):
    """Every quantized tensor of model.gguf, dequantized by gguf's reference code, equals the
    student's codes * step with the step rounded to fp16 (GGUF's block scale), bit for bit."""
    s = student(bits, **kw)
    report, g = exported(tmp_path, s)
    _, manifest = read_manifest(tmp_path / "e")
    tensors = read_tensors(tmp_path / "e")
    reader = gguf.GGUFReader(g / GGUF_FILE)
    by_name = {t.name: t for t in reader.tensors}
    assert "output.weight" not in by_name  # tied head: one table, read by llama.cpp as its output matrix
    checked = 0
    for key, entry in manifest["packed"].items():
        t = by_name[GPT2.gguf_name(key)]
        assert t.tensor_type.name == qtype
        codes, step = decode(tensors, key, entry)
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(codes.shape)
        want = codes.float() * step.reshape(-1, 1).half().float()
        assert torch.equal(got, want), key
        checked += 1
    assert checked == 9  # 4 matrices per layer x 2 + the token embedding
    for key in manifest["fp"]:
        if name := GPT2.gguf_name(key):
            assert torch.equal(torch.from_numpy(np.array(by_name[name].data)).reshape(tensors[key].shape),
                               tensors[key].float())
    assert 0 < report.max_step_rounding < 2**-11  # fp16 has an 11-bit significand
    if bits == 2:
        ternary = "grid" not in kw.get("quantizer_kwargs", {})
        codes, _ = decode(tensors, "transformer.wte.weight", manifest["packed"]["transformer.wte.weight"])
        assert (int(codes.min()) == -1) == ternary


def test_gguf_metadata_and_size(tmp_path):
    report, g = exported(tmp_path, student(2))
    reader = gguf.GGUFReader(g / GGUF_FILE)
    f = reader.fields

    def scalar(key):
        return f[key].parts[f[key].data[0]].tolist()[0]

    assert bytes(f["general.architecture"].parts[-1]).decode() == "gpt2"
    assert scalar("gpt2.embedding_length") == 256 and scalar("gpt2.block_count") == 2
    assert scalar("gpt2.context_length") == 64 and scalar("gpt2.feed_forward_length") == 1024
    assert json.loads(bytes(f["qgplm.bits"].parts[-1]).decode()) == {"weight": [2], "embedding": [2]}
    assert report.file_bytes == (g / GGUF_FILE).stat().st_size and report.ratio > 8
    assert "TQ2_0" in report.table() and "compression" in report.table()
    assert (g / "config.json").is_file()


# ---------------------------------------------------------------- llama.cpp runs it


@pytest.mark.parametrize("bits, kw", [(2, {}), (2, {"quantizer_kwargs": {"grid": "full"}}), (4, {}), (8, {})])
def test_llama_cpp_logits_match_the_student(tmp_path, bits, kw):
    """llama.cpp's logits differ from the student's by its own 8-bit activation quantization only."""
    s = student(bits, **kw)
    _, g = exported(tmp_path, s)
    lm = LlamaCppCausalLM(g, s.config, threads=2)
    with torch.no_grad():
        ref = s(input_ids=IDS).logits
        got = lm(input_ids=IDS).logits
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    ppl = lambda lg: torch.exp(torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, VOCAB),  # noqa: E731
                                                                 IDS[:, 1:].reshape(-1)))
    assert abs(float(ppl(got) / ppl(ref)) - 1) < 0.01
    lm.lm.close()


def test_a_wrong_scale_would_be_caught(tmp_path):
    """The tolerance above is tight enough to see a wrong code mapping: the same check fails on a
    file whose full-grid rows kept a positive scale."""
    s = student(2, quantizer_kwargs={"grid": "full"})
    export_model(s, tmp_path / "e")
    import qgplm.export.converters.gguf as g

    real = g.encode_tq2_0
    g.ENCODERS["TQ2_0"] = lambda codes, step: real(codes.clamp(-1, 1), step)  # -2 lost
    try:
        export_gguf(tmp_path / "e", tmp_path / "g")
    finally:
        g.ENCODERS["TQ2_0"] = real
    lm = LlamaCppCausalLM(tmp_path / "g", s.config, threads=2)
    with torch.no_grad():
        ref, got = s(input_ids=IDS).logits, lm(input_ids=IDS).logits
    assert (got - ref).abs().max() > 0.05 * ref.abs().max()
    lm.lm.close()


def test_greedy_matches_the_logits(tmp_path):
    s = student(2)
    _, g = exported(tmp_path, s)
    lm = LlamaCppLM(g, n_ctx=64, threads=2)
    prompt = IDS[0, :6].tolist()
    new = lm.greedy(prompt, 8)
    assert len(new) == 8
    full = lm.logits(prompt + new)  # recomputed without the KV cache: same greedy choices
    assert [int(i) for i in full[len(prompt) - 1:-1].argmax(-1)] == new
    with pytest.raises(QgplmError, match="do not fit n_ctx"):
        lm.greedy(prompt, 1000)
    lm.close()


def test_left_padding_is_refused(tmp_path):
    s = student(2)
    _, g = exported(tmp_path, s)
    lm = LlamaCppCausalLM(g, s.config, threads=2)
    mask = torch.ones_like(IDS)
    mask[0, :3] = 0
    with pytest.raises(QgplmError, match="right-padded"):
        lm(input_ids=IDS, attention_mask=mask)
    mask = torch.ones_like(IDS)
    mask[0, -3:] = 0  # right padding: the valid prefix is scored, the rest is 0
    out = lm(input_ids=IDS, attention_mask=mask).logits
    assert torch.equal(out[0, -3:], torch.zeros_like(out[0, -3:])) and out[0, :-3].abs().sum() > 0
    lm.lm.close()


def test_gpt2_tokenizer_round_trips_in_llama_cpp(tmp_path):
    """The file's BPE vocabulary and merges tokenize text as the HF tokenizer does."""
    tok = GPT2TokenizerFast.from_pretrained(SHARED_DATA / "gpt2-tokenizer")
    s = student(2, model=gpt2_256(vocab=len(tok), layers=1, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id))
    _, g = exported(tmp_path, s, tok)
    lm = LlamaCppLM(g, n_ctx=64, threads=2)
    for text in ["The quick brown fox jumps over the lazy dog.", " Hello, world! It's 2026 -- naïve café\n\nNew line"]:
        ids = tok(text)["input_ids"]
        assert lm.llm.tokenize(text.encode(), add_bos=False, special=False) == ids
        assert lm.llm.detokenize(ids).decode() == text
    assert lm.llm.token_eos() == tok.eos_token_id
    lm.close()


# ---------------------------------------------------------------- errors and CLI


def test_bart_is_one_line(tmp_path):
    s = quantize_model(tiny_bart(), QuantConfig(weight_bits=2, embedding_bits=2))
    with pytest.raises(QgplmError, match=r"format=gguf supports GPT-2 \(GPT2LMHeadModel\), .*not "
                                         r"BartForConditionalGeneration: use format=onnx"):
        export_gguf(s, tmp_path / "g")


def test_erf_gelu_is_refused(tmp_path):
    s = quantize_model(gpt2_256(layers=1, activation_function="gelu"), QuantConfig())
    with pytest.raises(QgplmError, match="tanh GELU"):
        export_gguf(s, tmp_path / "g")


def test_non_empty_out_dir_is_refused(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "keep.txt").write_text("mine")
    with pytest.raises(QgplmError, match="not empty"):
        export_gguf(student(2), tmp_path / "g")
    assert (tmp_path / "g" / "keep.txt").read_text() == "mine"


def test_corrupt_file_is_one_line(tmp_path):
    _, g = exported(tmp_path, student(2))
    data = (g / GGUF_FILE).read_bytes()
    (g / GGUF_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(QgplmError, match="llama.cpp cannot load .*export it again"):
        LlamaCppLM(g, n_ctx=64, threads=2)
    with pytest.raises(QgplmError, match="does not exist.*format=gguf"):
        LlamaCppLM(tmp_path / "nowhere", n_ctx=64)


def test_cli_export_and_generate(tmp_path):
    hf = tmp_path / "hf"
    tok = GPT2TokenizerFast.from_pretrained(SHARED_DATA / "gpt2-tokenizer")
    gpt2_256(vocab=len(tok), layers=1).save_pretrained(hf)
    for f in (SHARED_DATA / "gpt2-tokenizer").iterdir():
        if f.name in ("vocab.json", "merges.txt"):
            shutil.copy(f, hf / f.name)
    proc = _py(["qgplm.export", f"model={hf}", f"out={tmp_path / 'g'}", "format=gguf"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TQ2_0" in proc.stdout and "compression" in proc.stdout
    assert {p.name for p in (tmp_path / "g").iterdir()} >= {GGUF_FILE, "config.json", "tokenizer_config.json"}
    proc = _py(["qgplm.generate", f"dir={tmp_path / 'g'}", "prompt=Hello there", "mode=gguf", "max_new_tokens=5",
                "threads=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
    from qgplm.cli.generate import main

    with pytest.raises(QgplmError, match="exceed the model's 64 positions"):
        main([f"dir={tmp_path / 'g'}", "prompt=Hello", "mode=gguf", "max_new_tokens=500"])
    with pytest.raises(QgplmError, match="block_size= only applies to mode=lowbit"):
        main([f"dir={tmp_path / 'g'}", "prompt=Hello", "mode=gguf", "block_size=32"])


@pytest.mark.parametrize("module, call, match", [
    ("gguf", lambda tmp: export_gguf(student(2), tmp / "g"), "format=gguf needs the gguf package.*format=onnx"),
    ("llama_cpp", lambda tmp: LlamaCppLM(tmp), "needs the llama-cpp-python package.*mode=lowbit"),
])
def test_missing_runtime_is_one_line(tmp_path, monkeypatch, module, call, match):
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(QgplmError, match=match):
        call(tmp_path)
