"""Bad model/tokenizer/teacher input ends in one clear QgplmError naming the fix."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from qgplm.config import ModelConfig
from qgplm.errors import QgplmError
from qgplm.models import build_model, check_compatible, load_pretrained, load_tokenizer
from tests.conftest import SHARED_DATA


def _tiny(vocab=50):
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=vocab, n_positions=32))


def test_model_dir_without_config_or_weights(tmp_path):
    with pytest.raises(QgplmError, match="has no config.json"):
        load_pretrained(str(tmp_path))
    _tiny().config.save_pretrained(tmp_path)
    with pytest.raises(QgplmError, match="has no weights"):
        load_pretrained(str(tmp_path))


def test_saved_local_model_loads(tmp_path):
    m = _tiny()
    m.save_pretrained(tmp_path)
    loaded = load_pretrained(str(tmp_path))
    x = torch.randint(0, 50, (1, 8))
    assert torch.equal(loaded.eval()(x).logits, m.eval()(x).logits)


def test_tokenizer_dir_missing_files(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(QgplmError, match="tokenizer"):
        load_tokenizer(str(tmp_path))


def test_shared_gpt2_tokenizer_folder_loads():
    tok = load_tokenizer(str(SHARED_DATA / "gpt2-tokenizer"))
    assert len(tok) == 50257 and tok("Hello world")["input_ids"] == [15496, 995]


def test_teacher_vocab_smaller_than_tokenizer():
    tok = load_tokenizer(str(SHARED_DATA / "gpt2-tokenizer"))
    with pytest.raises(QgplmError, match="tokenizer has 50257 tokens but the model's embedding only 50"):
        check_compatible(_tiny(50), tok, 16)


def test_block_size_beyond_positions():
    tok = load_tokenizer(str(SHARED_DATA / "gpt2-tokenizer"))
    with pytest.raises(QgplmError, match="task.block_size=64 exceeds the model's 32 positions"):
        check_compatible(_tiny(50257), tok, 64)


def test_unknown_arch_for_random_init():
    tok = load_tokenizer(str(SHARED_DATA / "gpt2-tokenizer"))
    with pytest.raises(QgplmError, match="model.arch='nonsense'"):
        build_model(ModelConfig(name="x", arch="nonsense", config={"n_layer": 1}), tok, 16)


def test_nan_loss_stops_with_step_and_term(tiny_cfg):
    from qgplm.config import RunConfig
    from qgplm.module import TeacherModule

    run = RunConfig.from_hydra(tiny_cfg())
    module = TeacherModule(_tiny(50), run.teacher.optim, 1)
    module.log = lambda *a, **k: None
    with torch.no_grad():
        module.model.lm_head.weight.fill_(float("nan"))
    x = torch.randint(0, 50, (2, 8))
    with pytest.raises(QgplmError, match=r"non-finite loss at step 0 in the ce term \(ce=nan\): lower teacher.optim.lr"):
        module.training_step({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}, 0)
