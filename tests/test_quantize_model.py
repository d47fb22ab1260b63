"""`quantize_model` on Hugging Face LMs: which modules are swapped, weight tying, equivalence with the
float model when quantization is off, gradients, and the paper's model-size accounting."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from qgplm.errors import QgplmError
from qgplm.quant import (
    ActivationQuantizer,
    DynamicScaleQuantizer,
    QuantConfig,
    QuantConv1D,
    QuantEmbedding,
    QuantLinear,
    initialize_quantizers,
    model_size,
    quantization_disabled,
    quantize_model,
    quantized_modules,
    scale_parameters,
    set_quantization_enabled,
    weight_quantizers,
)
from qgplm.quant.functional import dynamic_scale_quantize

MIB = 2**20
VOCAB = 97
CONV_NAMES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def ids(seed: int = 1, shape=(2, 12)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, shape, generator=g)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def convs(model):
    for i, block in enumerate(model.transformer.h):
        for name in CONV_NAMES:
            yield f"transformer.h.{i}.{name}", block.get_submodule(name)


# ------------------------------------------------------------------------------ module swapping


def test_gpt2_modules_swapped_and_tied():
    model = tiny_gpt2()
    wte, wpe, head = model.transformer.wte, model.transformer.wpe, model.lm_head
    tok_weight = wte.weight
    assert head.weight is tok_weight
    old_convs = {name: mod for name, mod in convs(model)}
    old_conv_params = {name: (mod.weight, mod.bias) for name, mod in old_convs.items()}
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    norm_params = {n: (m.weight, m.bias, m.weight.detach().clone()) for n, m in norms.items()}
    float_keys = set(model.state_dict())
    count_before = n_params(model)

    out = quantize_model(model, QuantConfig(weight_bits=2, embedding_bits=2, activation_bits=8))
    assert out is model  # in place

    # every Conv1D of the blocks -> QuantConv1D, reusing the same Parameter objects
    for name, mod in convs(model):
        assert type(mod) is QuantConv1D, name
        assert mod.weight is old_conv_params[name][0] and mod.bias is old_conv_params[name][1]
        assert isinstance(mod.weight_quantizer, DynamicScaleQuantizer) and mod.weight_quantizer.bits == 2
        assert isinstance(mod.act_quantizer, ActivationQuantizer) and mod.act_quantizer.bits == 8
    assert not any(type(m) is Conv1D for m in model.modules())

    # token embedding and tied head: same Parameter, same quantizer object
    new_wte, new_head = model.transformer.wte, model.lm_head
    assert type(new_wte) is QuantEmbedding
    assert type(new_head) is QuantLinear
    assert new_wte.weight is tok_weight and new_head.weight is tok_weight
    assert new_head.weight_quantizer is new_wte.weight_quantizer
    assert new_wte.weight_quantizer.bits == 2
    assert isinstance(new_head.act_quantizer, ActivationQuantizer)
    assert model.get_output_embeddings() is new_head and model.get_input_embeddings() is new_wte

    # position embedding and LayerNorms untouched (same objects, same params, same values)
    assert model.transformer.wpe is wpe and type(wpe) is nn.Embedding
    for n, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            assert norms[n] is m
            w, b, val = norm_params[n]
            assert m.weight is w and m.bias is b and torch.equal(m.weight, val)
    assert set(norms) == {n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}

    # distinct quantizers: 2 layers x 4 Conv1D + 1 shared embedding/head = 9 scalar gammas
    qs = list(weight_quantizers(model))
    assert len(qs) == 9
    gammas = scale_parameters(model)
    assert len(gammas) == 9 and all(g.numel() == 1 for g in gammas)
    assert n_params(model) == count_before + 9

    # every float state-dict key is still there; quantizers only add their own entries
    sd = model.state_dict()
    assert float_keys <= set(sd)
    extra = set(sd) - float_keys
    assert extra and all(".weight_quantizer." in k for k in extra)
    assert "lm_head.weight_quantizer.gamma" in extra and "transformer.wte.weight_quantizer.gamma" in extra


def test_float_state_dict_loads_into_quantized_model():
    float_model = tiny_gpt2(seed=3)
    model = quantize_model(tiny_gpt2(seed=4), QuantConfig())
    missing, unexpected = model.load_state_dict(float_model.state_dict(), strict=False)
    assert unexpected == []
    assert all(".weight_quantizer." in k for k in missing)
    with quantization_disabled(model):
        assert torch.equal(model(ids()).logits, float_model(ids()).logits)


def test_logits_disabled_equal_float_enabled_differ():
    model = tiny_gpt2()
    reference = copy.deepcopy(model)
    x = ids()
    with torch.no_grad():
        ref = reference(x).logits
        quantize_model(model, QuantConfig())
        with quantization_disabled(model):
            off = model(x).logits
        on = model(x).logits
        after = model(x).logits
    assert on.shape == ref.shape == (2, 12, VOCAB)
    assert torch.equal(off, ref)
    assert not torch.allclose(on, ref, atol=1e-3)
    assert torch.isfinite(on).all()
    assert torch.equal(on, after)  # deterministic and the context manager re-enabled everything
    assert all(m.enabled for m in model.modules() if isinstance(m, (ActivationQuantizer, DynamicScaleQuantizer)))
    set_quantization_enabled(model, False)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)


def test_quantconv1d_uses_out_in_orientation_per_row():
    """The quantizer sees Conv1D's weight as [out, in]: per-row gamma has nf entries and the layer's
    output equals x @ Q(W^T)^T + b computed by hand."""
    model = quantize_model(tiny_gpt2(), QuantConfig(weight_bits=4, embedding_bits=4, activation_bits=None,
                                                    per_row=True))
    conv = model.transformer.h[0].attn.c_attn
    assert conv.act_quantizer is None
    q = conv.weight_quantizer
    assert q.gamma.shape == (96,)  # nf = 3 * n_embd output channels
    with torch.no_grad():
        q.gamma.copy_(torch.linspace(0.8, 3.0, 96))
    x = torch.randn(2, 5, 32)
    wq_out_in = dynamic_scale_quantize(conv.weight.t(), q.gamma, 4, per_row=True)
    expect = x @ wq_out_in.t() + conv.bias
    torch.testing.assert_close(conv(x), expect, rtol=1e-5, atol=1e-6)
    # per-token (row) scales for the embedding; the head shares them
    assert model.transformer.wte.weight_quantizer.gamma.shape == (VOCAB,)
    assert model.lm_head.weight_quantizer is model.transformer.wte.weight_quantizer
    assert n_params(model) == n_params(tiny_gpt2()) + 2 * (96 + 32 + 128 + 32) + VOCAB


def test_initialize_quantizers_once_and_state_dict():
    model = quantize_model(tiny_gpt2(), QuantConfig())
    assert initialize_quantizers(model) == 9
    assert initialize_quantizers(model) == 0  # already initialised (the head shares wte's quantizer)
    sd = model.state_dict()
    assert all(bool(v) for k, v in sd.items() if k.endswith("initialized"))
    # a gamma initialised from the transposed Conv1D weight
    conv = model.transformer.h[1].mlp.c_fc
    fresh = DynamicScaleQuantizer(2)
    fresh.initialize(conv.weight.detach().t())
    assert conv.weight_quantizer.gamma.item() == pytest.approx(fresh.gamma.item())


# ------------------------------------------------------------------------------- config filters


def test_full_precision_config_is_noop():
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mods_before = dict(model.named_modules())
    out = quantize_model(model, QuantConfig(weight_bits=None, embedding_bits=None, activation_bits=None))
    assert out is model
    assert dict(model.named_modules()) == mods_before
    assert not list(quantized_modules(model))
    sd = model.state_dict()
    assert set(sd) == set(before) and all(torch.equal(sd[k], before[k]) for k in before)
    # and a full-precision model can still be quantized afterwards
    quantize_model(model, QuantConfig())
    assert type(model.lm_head) is QuantLinear


def test_activations_only():
    model = tiny_gpt2()
    reference = copy.deepcopy(model)
    quantize_model(model, QuantConfig(weight_bits=None, embedding_bits=None, activation_bits=8))
    assert type(model.transformer.wte) is nn.Embedding  # embedding not touched
    for _name, mod in convs(model):
        assert type(mod) is QuantConv1D
        assert isinstance(mod.act_quantizer, ActivationQuantizer) and mod.act_quantizer.bits == 8
        assert not isinstance(mod.weight_quantizer, DynamicScaleQuantizer)
        assert mod.weight_quantizer(mod.weight) is mod.weight  # weight stays full precision
    assert not scale_parameters(model)
    assert n_params(model) == n_params(reference)
    x = ids()
    with torch.no_grad():
        ref, out = reference(x).logits, model(x).logits
        # only the 8-bit inputs differ: close to the float logits, but not equal
        assert not torch.equal(out, ref)
        assert (out - ref).abs().max() < 0.05 * ref.abs().max()
        for m in model.modules():
            if isinstance(m, ActivationQuantizer):
                m.enabled = False
        assert torch.equal(model(x).logits, ref)
    rep = model_size(model)
    assert rep.quantized_bytes == rep.fp32_bytes


def test_weights_fp_embedding_quantized():
    model = quantize_model(tiny_gpt2(), QuantConfig(weight_bits=None, embedding_bits=4, activation_bits=8))
    assert type(model.transformer.wte) is QuantEmbedding
    assert model.transformer.wte.weight_quantizer.bits == 4
    assert model.lm_head.weight_quantizer is model.transformer.wte.weight_quantizer
    assert len(scale_parameters(model)) == 1


def test_exclude_attention_leaves_attention_float():
    model = quantize_model(tiny_gpt2(), QuantConfig(exclude=[r"attn"]))
    for i in range(2):
        blk = model.transformer.h[i]
        assert type(blk.attn.c_attn) is Conv1D and type(blk.attn.c_proj) is Conv1D
        assert type(blk.mlp.c_fc) is QuantConv1D and type(blk.mlp.c_proj) is QuantConv1D
    assert type(model.transformer.wte) is QuantEmbedding
    assert len(list(weight_quantizers(model))) == 5


def test_include_filter():
    model = quantize_model(tiny_gpt2(), QuantConfig(include=[r"h\.1\.mlp\.c_fc$", r"wte"]))
    swapped = {n for n, _ in quantized_modules(model)}
    assert swapped == {"transformer.h.1.mlp.c_fc", "transformer.wte"}
    assert type(model.transformer.h[0].mlp.c_fc) is Conv1D
    assert type(model.lm_head) is nn.Linear


def test_quantize_twice_raises():
    model = quantize_model(tiny_gpt2(), QuantConfig())
    with pytest.raises(QgplmError, match="already quantized"):
        quantize_model(model, QuantConfig())
    with pytest.raises(QgplmError):
        quantize_model(model, QuantConfig(weight_bits=8, embedding_bits=8))


def test_unknown_quantizer_raises():
    with pytest.raises(QgplmError, match="unknown quantizer"):
        quantize_model(tiny_gpt2(), QuantConfig(quantizer="no-such-method"))


# ------------------------------------------------------------------------------------- backward


@pytest.mark.parametrize("per_row", [False, True])
def test_backward_reaches_weights_and_every_gamma(per_row):
    model = quantize_model(tiny_gpt2(), QuantConfig(per_row=per_row))
    initialize_quantizers(model)
    model.train()
    x = ids(shape=(3, 16))
    loss = model(x, labels=x).loss
    assert torch.isfinite(loss)
    loss.backward()
    gammas = scale_parameters(model)
    assert len(gammas) == 9
    for g in gammas:
        assert g.grad is not None and torch.isfinite(g.grad).all()
        assert g.grad.abs().sum() > 0
    for name, mod in convs(model):
        assert mod.weight.grad is not None and mod.weight.grad.abs().sum() > 0, name
        assert mod.bias.grad is not None
    assert model.transformer.wte.weight.grad.abs().sum() > 0
    assert model.transformer.wpe.weight.grad.abs().sum() > 0
    assert model.transformer.ln_f.weight.grad is not None


def test_tied_gamma_gets_gradient_from_embedding_and_head():
    model = quantize_model(tiny_gpt2(), QuantConfig(activation_bits=None))
    gamma = model.transformer.wte.weight_quantizer.gamma
    x = ids()
    # embedding only: the head's output is unused
    model.transformer(x).last_hidden_state.sum().backward()
    g_emb = gamma.grad.clone()
    gamma.grad = None
    model(x).logits.sum().backward()
    g_both = gamma.grad.clone()
    assert g_emb.abs() > 0 and not torch.allclose(g_emb, g_both)


# ------------------------------------------------------------------------------------ model size


def test_model_size_gpt2_small_w2e2a8_paper_numbers():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())  # random init, ~0.5 GB
    fp = model_size(model)
    assert round(fp.fp32_mib, 1) == 474.7
    assert fp.quantized_bytes == fp.fp32_bytes
    quantize_model(model, QuantConfig(weight_bits=2, embedding_bits=2, activation_bits=8))
    rep = model_size(model)
    assert round(rep.fp32_mib, 1) == 474.7  # gammas are not counted as model parameters
    assert round(rep.quantized_mib, 1) == 32.9
    assert round(rep.compression, 1) == 14.4
    # 124,439,808 params; quantized: wte 38,597,376 + 12 x 7,077,888 block weights; 49 scales
    assert rep.codes_bytes == (38_597_376 + 12 * 7_077_888) * 2 / 8
    assert rep.scales_bytes == 49 * 4
    assert rep.fp_bytes == (124_439_808 - 38_597_376 - 12 * 7_077_888) * 4


def test_model_size_gpt2_small_w8e8a8_and_per_row():
    with torch.device("meta"):  # sizes only need shapes
        model = GPT2LMHeadModel(GPT2Config())
        row_model = GPT2LMHeadModel(GPT2Config())
    quantize_model(model, QuantConfig(weight_bits=8, embedding_bits=8, activation_bits=8))
    rep = model_size(model)
    assert round(rep.fp32_mib, 1) == 474.7
    assert round(rep.quantized_mib, 1) == 121.3
    quantize_model(row_model, QuantConfig(weight_bits=8, embedding_bits=8, per_row=True))
    rows = model_size(row_model)
    # one scale per output row: wte 50257 + per block (2304 + 768 + 3072 + 768)
    assert rows.scales_bytes == (50257 + 12 * (2304 + 768 + 3072 + 768)) * 4
    assert rows.codes_bytes == rep.codes_bytes


def test_model_size_tiny_gpt2_mixed_bits():
    """Tiny GPT-2, 29,600 params: wte 3104 (E bits), 24,576 block weights (W bits), 1,920 FP
    (wpe 1024, biases 576, LayerNorms 320); 9 per-tensor scales. W2E4:
    2*24576 + 4*3104 + 32*9 + 32*1920 = 123,296 bits = 15,412 bytes."""
    model = tiny_gpt2()
    assert n_params(model) == 29_600
    quantize_model(model, QuantConfig(weight_bits=2, embedding_bits=4))
    rep = model_size(model)
    assert rep.fp32_bytes == 29_600 * 4
    assert rep.codes_bytes == (2 * 24_576 + 4 * 3_104) / 8
    assert rep.scales_bytes == 9 * 4
    assert rep.fp_bytes == 1_920 * 4
    assert rep.quantized_bytes == 15_412


def test_model_size_linear_exact_bytes():
    # Linear(4, 3) at 2 bits: 12 * 2 bits codes + one 32-bit scale + 3 * 32-bit bias = 24 + 32 + 96
    # = 152 bits = 19 bytes; FP32: 15 params * 4 = 60 bytes
    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Linear(4, 3)), QuantConfig(weight_bits=2, activation_bits=8))
    assert type(model[0]) is QuantLinear
    rep = model_size(model)
    assert (rep.fp32_bytes, rep.codes_bytes, rep.scales_bytes, rep.fp_bytes) == (60, 3, 4, 12)
    assert rep.quantized_bytes == 19
    assert rep.compression == pytest.approx(60 / 19)
    # per_row: one scale per output row: 24 + 3 * 32 + 96 = 216 bits = 27 bytes
    row = quantize_model(nn.Sequential(nn.Linear(4, 3)), QuantConfig(weight_bits=2, per_row=True))
    assert row[0].weight_quantizer.gamma.shape == (3,)
    rep_row = model_size(row)
    assert (rep_row.scales_bytes, rep_row.quantized_bytes) == (12, 27)
    # 4 bits, no bias: 12 * 4 + 32 = 80 bits = 10 bytes
    nb = quantize_model(nn.Sequential(nn.Linear(4, 3, bias=False)), QuantConfig(weight_bits=4))
    assert model_size(nb).quantized_bytes == 10


# --------------------------------------------------------------------------- generic HF models


def tiny_llama(tie_word_embeddings: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=tie_word_embeddings)
    return LlamaForCausalLM(cfg).eval()


def tiny_opt() -> OPTForCausalLM:
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                    max_position_embeddings=32, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0,
                    pad_token_id=1)
    return OPTForCausalLM(cfg).eval()


@pytest.mark.parametrize("build", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_generic_causal_lm_linears_swapped(build):
    model = build()
    reference = copy.deepcopy(model)
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    head = model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    x = ids()
    quantize_model(model, QuantConfig())
    for name in linears:
        assert type(model.get_submodule(name)) is QuantLinear, name
    assert not any(type(m) is nn.Linear for m in model.modules())
    emb = model.get_input_embeddings()
    assert type(emb) is QuantEmbedding
    new_head = model.get_output_embeddings()
    if tied:
        assert new_head.weight_quantizer is emb.weight_quantizer
    else:
        assert new_head.weight_quantizer is not emb.weight_quantizer
        assert new_head.weight_quantizer.bits == 2  # an untied head gets embedding_bits
    # other embeddings (OPT's learned positions) stay float
    others = [m for m in model.modules() if isinstance(m, nn.Embedding) and m is not emb]
    assert all(not isinstance(m, QuantEmbedding) for m in others)
    with torch.no_grad():
        ref = reference(x).logits
        on = model(x).logits
        with quantization_disabled(model):
            off = model(x).logits
    assert on.shape == ref.shape == (2, 12, VOCAB)
    assert torch.isfinite(on).all()
    assert not torch.allclose(on, ref, atol=1e-3)
    torch.testing.assert_close(off, ref, rtol=0, atol=1e-6)
    # non-persistent buffers (Llama's rotary inv_freq) are not model weights
    assert model_size(model).fp32_bytes == 4 * n_params(reference)


# ----------------------------------------------------------------------------------------- BART


def bart_base_config(**kw) -> BartConfig:
    return BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                      encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                      decoder_ffn_dim=3072, max_position_embeddings=1024, **kw)


def test_model_size_bart_base_paper_numbers():
    """docs/method.md: BART-base 532.0 MiB FP32 -> 39.6 MiB at W2E2A8 (13.4x), 138.1 MiB at W8E8A8. The
    FP part includes final_logits_bias (a persistent buffer, 50265 floats = 0.19 MiB)."""
    with torch.device("meta"):
        w2 = BartForConditionalGeneration(bart_base_config())
        w8 = BartForConditionalGeneration(bart_base_config())
    assert round(model_size(w2).fp32_mib, 1) == 532.0
    quantize_model(w2, QuantConfig(weight_bits=2, embedding_bits=2, activation_bits=8))
    quantize_model(w8, QuantConfig(weight_bits=8, embedding_bits=8, activation_bits=8))
    r2, r8 = model_size(w2), model_size(w8)
    assert round(r2.fp32_mib, 1) == 532.0
    assert round(r2.quantized_mib, 1) == 39.6
    assert round(r2.compression, 1) == 13.4
    assert round(r8.quantized_mib, 1) == 138.1


def test_bart_shared_embedding_scale_and_cross_attention():
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
                     scale_embedding=True, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                     decoder_start_token_id=2, forced_eos_token_id=None)
    model = BartForConditionalGeneration(cfg).eval()
    reference = copy.deepcopy(model)
    positions = model.model.encoder.embed_positions
    quantize_model(model, QuantConfig())
    shared, enc, dec = model.model.shared, model.model.encoder.embed_tokens, model.model.decoder.embed_tokens
    assert all(type(m) is QuantEmbedding for m in (shared, enc, dec))
    assert enc.weight_quantizer is shared.weight_quantizer is dec.weight_quantizer is model.lm_head.weight_quantizer
    assert enc.embed_scale == pytest.approx(32**0.5)  # the scaled word embedding keeps its scale
    assert model.model.encoder.embed_positions is positions
    cross = model.model.decoder.layers[0].encoder_attn
    assert all(type(getattr(cross, n)) is QuantLinear for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
    assert len(scale_parameters(model)) == 1 + 6 + 10  # embedding, encoder layer, decoder layer
    x = ids(shape=(2, 8))
    with torch.no_grad():
        ref = reference(input_ids=x, decoder_input_ids=x).logits
        with quantization_disabled(model):
            off = model(input_ids=x, decoder_input_ids=x).logits
        on = model(input_ids=x, decoder_input_ids=x).logits
    assert torch.equal(off, ref)
    assert not torch.allclose(on, ref, atol=1e-3)
    assert "final_logits_bias" in model.state_dict()


def test_quantize_attention_flag_is_exact_eager_when_disabled_and_quantizes_when_on():
    import copy as _copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from qgplm.quant import ActivationQuantizer, initialize_quantizers, quantization_disabled

    torch.manual_seed(0)
    for model in (GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=60, n_positions=32)),
                  LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=60))):
        model.eval().set_attn_implementation("eager")
        x = torch.randint(0, 60, (2, 10))
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[0, :3] = 0
        ref = model(x, attention_mask=mask).logits
        qcfg = QuantConfig(weight_bits=2, embedding_bits=2, activation_bits=8, quantize_attention=True)
        q = quantize_model(_copy.deepcopy(model), qcfg)
        initialize_quantizers(q)
        attn = [m for m in q.modules() if hasattr(m, "attn_act_quantizer")]
        assert attn and all(isinstance(m.attn_act_quantizer, ActivationQuantizer) for m in attn)
        with quantization_disabled(q):
            assert torch.equal(q(x, attention_mask=mask).logits, ref)
        # weights quantized only vs weights + attention matmuls quantized: different outputs
        q_plain = quantize_model(_copy.deepcopy(model), QuantConfig(weight_bits=2, embedding_bits=2, activation_bits=8))
        q_plain.load_state_dict(q.state_dict(), strict=False)
        assert not torch.equal(q(x).logits, q_plain(x).logits)


def test_quantize_attention_off_by_default_keeps_the_attention_implementation():
    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=30))
    impl = m.config._attn_implementation
    quantize_model(m, QuantConfig(weight_bits=2, embedding_bits=2, activation_bits=8))
    assert m.config._attn_implementation == impl
    assert not any(hasattr(mod, "attn_act_quantizer") for mod in m.modules())


def test_seq2seq_untied_decoder_embedding_and_head_get_embedding_bits_with_own_quantizers():
    """An encoder-decoder with untied tables (tie_word_embeddings=False: in transformers 5 the
    encoder's embed_tokens is then not `shared`; plus a separate decoder embed_tokens) still gets
    every token table and the untied head quantized at embedding_bits, one quantizer per distinct
    Parameter; position embeddings stay FP."""
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
                     tie_word_embeddings=False)
    model = BartForConditionalGeneration(cfg).eval()
    model.model.decoder.embed_tokens = torch.nn.Embedding(VOCAB, 32, padding_idx=cfg.pad_token_id)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    quantize_model(model, QuantConfig(weight_bits=4, embedding_bits=2, activation_bits=8))
    enc, dec, head = model.model.encoder.embed_tokens, model.model.decoder.embed_tokens, model.lm_head
    assert type(enc) is QuantEmbedding and type(dec) is QuantEmbedding and type(head) is QuantLinear
    qs = {id(enc.weight_quantizer), id(dec.weight_quantizer), id(head.weight_quantizer)}
    assert len(qs) == 3 and all(q.bits == 2 for q in (enc.weight_quantizer, dec.weight_quantizer,
                                                       head.weight_quantizer))
    assert type(model.model.decoder.embed_positions).__name__ == "BartLearnedPositionalEmbedding"


# ------------------------------------------------------------------ a tied table, quantized once a forward


def tied_llama() -> LlamaForCausalLM:
    """tiny_llama with the head tied to the embedding, as SmolLM2's."""
    model = tiny_llama(tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model


def _count_quantize(monkeypatch, quantizer) -> list[int]:
    calls = [0]
    original = quantizer.quantize

    def counted(w):
        calls[0] += 1
        return original(w)

    monkeypatch.setattr(quantizer, "quantize", counted)
    return calls


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [tiny_gpt2, tied_llama])
def test_tied_table_quantized_once_a_forward_same_logits_and_gradients(build, monkeypatch):
    """The token embedding and the LM head tied to it share one quantizer, which computes its output
    once per forward: the same logits to the bit and the same gradients (both layers' gradients
    reach one autograd node, summed) as quantizing it for each layer; nothing is kept after the
    forward; micro-batches (two forwards, one backward) each get their own graph."""
    model = quantize_model(build(), QuantConfig())
    initialize_quantizers(model)  # eval mode (no dropout); gradients flow all the same
    table = model.get_input_embeddings().weight_quantizer
    assert table.shared and model.get_output_embeddings().weight_quantizer is table
    reference = copy.deepcopy(model)
    reference.get_input_embeddings().weight_quantizer.shared = False  # quantized by each layer
    calls = _count_quantize(monkeypatch, table)
    x = ids(shape=(2, 10))
    logits = model(x).logits
    assert calls[0] == 1 and table._last is None  # once, and dropped after the forward
    ref_logits = reference(x).logits
    assert torch.equal(logits, ref_logits)
    (logits.float().square().mean()).backward()
    (ref_logits.float().square().mean()).backward()
    got, want = _grads(model), _grads(reference)
    assert got.keys() == want.keys() and table.gamma.grad.abs() > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    # gradient accumulation: two forwards before one backward, each with its own graph
    model.zero_grad()
    reference.zero_grad()
    y = ids(seed=2, shape=(2, 10))
    (model(x).logits.sum() + model(y).logits.sum()).backward()
    (reference(x).logits.sum() + reference(y).logits.sum()).backward()
    assert calls[0] == 3
    for name, g in _grads(reference).items():
        torch.testing.assert_close(_grads(model)[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_tied_table_direct_calls_recompute_and_copies_carry_no_output():
    """Layers called by hand (no model forward around them): a layer asking twice gets a fresh tensor
    each time, the other layer reuses the last one; the kept tensor is not copied with the model, and
    an optimizer step (a new weight version) makes the next call quantize again."""
    model = quantize_model(tied_llama(), QuantConfig(activation_bits=None))
    initialize_quantizers(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    table = emb.weight_quantizer
    x = ids(shape=(1, 6))
    first = emb(x)
    second = emb(x)
    assert torch.equal(first, second) and first.grad_fn is not second.grad_fn
    kept = table._last[1]
    h = torch.randn(1, 6, head.in_features)
    head(h)
    assert table._last[1] is kept  # the head reused the embedding's tensor
    clone = copy.deepcopy(model)  # a non-leaf tensor in the copy would raise here
    assert clone.get_input_embeddings().weight_quantizer._last is None
    with torch.no_grad():
        emb.weight.add_(0.01)
    head(h)
    assert table._last[1] is not kept
