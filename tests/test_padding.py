"""Padding never changes a real token's output (activation ranges skip pad positions).

Each case runs a model on a padded batch and on the same batch with 16 more pad positions (holding
random token ids: what sits at a masked position must not matter either), and
checks the real tokens' logits are identical (torch.equal): the W2E2A8 student (and with quantized
attention, symmetric activations, in train mode through the training forward), both export modes,
and generation (greedy on left-padded GPT-2 prompts, beam search on right-padded BART sources).

The float kernels themselves are bit-identical under extra padding only where their blocking does
not change: on this CPU a matmul with fewer than 16 rows, a softmax over fewer than 16 keys and
(SDPA) a left pad that is not a multiple of 16 take other code paths, whose rounding differs by
~1e-8. So the batches hold 16 positions, get 16 more, and every case first checks that the FP model
is exact on them: any difference left is the quantization's. BART's positions are absolute (no
position_ids), so extra *left* padding moves its real tokens even in FP; its left-padding case
changes what the pad positions hold instead (random tokens), the same shapes otherwise.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

from qgplm.export import export_model, load_quantized
from qgplm.quant import QuantConfig, initialize_quantizers, quantize_model
from qgplm.quant.functional import minmax_activation_codes
from qgplm.train.module import disable_dropout, model_forward

VOCAB, T, EXTRA = 100, 16, 16
GPT2_PAD, BART_PAD = 0, 1


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=128,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=GPT2_PAD)).eval()


def tiny_bart() -> BartForConditionalGeneration:
    # dropout=0: BART's dropout is functional (config.dropout), which `disable_dropout` (nn.Dropout
    # modules) does not reach, so train-mode forwards would differ by their random masks
    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(dropout=0.0,
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB, max_position_embeddings=128,
        pad_token_id=BART_PAD, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)).eval()


FP = {"gpt2": tiny_gpt2(), "bart": tiny_bart()}


def student(arch: str, **kw) -> torch.nn.Module:
    s = quantize_model(copy.deepcopy(FP[arch]), QuantConfig(weight_bits=2, embedding_bits=2, activation_bits=8, **kw))
    initialize_quantizers(s)
    return s.eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("padding")
    for arch in FP:
        export_model(student(arch), root / arch)
    return root


@functools.cache
def _built(kind: str, arch: str) -> torch.nn.Module:
    if kind == "student_copy":  # a deep copy of a quantized model keeps the hooks
        return copy.deepcopy(_built("student", arch))
    return student(arch, **{"attention": {"quantize_attention": True},
                            "symmetric": {"activation_symmetric": True},
                            "per_token": {"activation_granularity": "token"},
                            "per_token_attention": {"activation_granularity": "token", "quantize_attention": True},
                            }.get(kind, {}))


def model_under_test(kind: str, arch: str, exports) -> torch.nn.Module:
    if kind == "fp":
        return FP[arch]
    if kind in ("dequantize", "int8"):
        return load_quantized(exports / arch, kind)
    return _built(kind, arch)  # eval mode, only ever run under no_grad: shared between cases


# ----------------------------------------------------------------------------- batches
G = torch.Generator().manual_seed(1)
IDS = torch.randint(3, VOCAB, (2, T), generator=G)
MASK = torch.ones(2, T, dtype=torch.long)
MASK[1, T // 2:] = 0  # row 1: 8 real tokens, 8 pads
LABELS = torch.randint(3, VOCAB, (2, T), generator=G)
LABELS[0, 10:] = -100  # BART summaries: row 0 padded


def _pad(t: torch.Tensor, n: int, value: int | None, left: bool) -> torch.Tensor:
    """n more columns of `value`; None: random token ids (what a pad position holds must not
    matter either, and left pads of one id at one position would all be alike)."""
    if value is None:
        z = torch.randint(3, VOCAB, (t.shape[0], n), generator=torch.Generator().manual_seed(3), dtype=t.dtype)
    else:
        z = torch.full((t.shape[0], n), value, dtype=t.dtype)
    return torch.cat([z, t], 1) if left else torch.cat([t, z], 1)


def gpt2_logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():  # positions from the mask, as generate() does: left pads do not shift them
        return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits


def gpt2_pair(model, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Real tokens' logits without and with 16 extra pads."""
    left = side == "left"
    ids, mask = (IDS.flip(1), MASK.flip(1)) if left else (IDS, MASK)
    ids = ids.masked_fill(mask == 0, GPT2_PAD)
    a = gpt2_logits(model, ids, mask)
    b = gpt2_logits(model, _pad(ids, EXTRA, None, left), _pad(mask, EXTRA, 0, left))
    b = b[:, EXTRA:] if left else b[:, :T]
    real = mask.bool()
    return a[real], b[real]


def bart_logits(model, ids, mask, labels) -> torch.Tensor:
    with torch.no_grad():  # the training / evaluation forward: decoder inputs and mask from the labels
        return model_forward(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}).logits


def bart_pair(model, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    real = LABELS != -100
    if side == "right":  # extra pads after the sources and after the summaries
        ids = IDS.masked_fill(MASK == 0, BART_PAD)
        a = bart_logits(model, ids, MASK, LABELS)
        b = bart_logits(model, _pad(ids, EXTRA, None, False), _pad(MASK, EXTRA, 0, False),
                        _pad(LABELS, EXTRA, -100, False))[:, :T]
        return a[real], b[real]
    mask = MASK.flip(1)  # left-padded sources; the pad positions hold pad ids, then random tokens
    ids = IDS.flip(1).masked_fill(mask == 0, BART_PAD)
    random_ids = torch.randint(3, VOCAB, ids.shape, generator=torch.Generator().manual_seed(2))
    noise = torch.where(mask.bool(), ids, random_ids)
    return bart_logits(model, ids, mask, LABELS)[real], bart_logits(model, noise, mask, LABELS)[real]


PAIRS = {"gpt2": gpt2_pair, "bart": bart_pair}
CASES = [("gpt2", "right"), ("gpt2", "left"), ("bart", "right"), ("bart", "left")]


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("arch,side", CASES)
@pytest.mark.parametrize("kind", ["student", "attention", "symmetric", "per_token", "student_copy", "dequantize",
                                  "int8"])
def test_real_token_logits_do_not_depend_on_padding(arch, side, kind, exports):
    a, b = PAIRS[arch](FP[arch], side)
    assert torch.equal(a, b), "precondition: the FP model is bit-identical on these shapes"
    a, b = PAIRS[arch](model_under_test(kind, arch, exports), side)
    assert torch.equal(a, b), f"max |diff| {(a - b).abs().max().item():.3g}"


@pytest.mark.parametrize("arch,side", CASES)
def test_per_token_attention_ranges_ignore_padding(arch, side):
    """Per-token attention quantization takes each query's range over its allowed keys. Equal up to
    float rounding only: a softmax over 16 more (masked) keys sums in another order, a row's largest
    probability can move by one ulp, and per token that one value sets the whole row's step (per
    tensor the coarser range absorbs it): measured up to 2e-6 of the logits' scale (BART, right
    pads). Pad keys inside the rows' ranges (the leak this guards against) moved GPT-2's logits by
    6e-5 (left pads) and 3e-3 (right pads) of their scale."""
    a, b = PAIRS[arch](_built("per_token_attention", arch), side)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * a.abs().max().item())


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_training_forward_ignores_padding(arch):
    """The student as DistillModule trains it (train mode, no dropout) through `model_forward`,
    right-padded as the collators pad (Persona-Chat rows, XSum documents and summaries)."""
    s = disable_dropout(student(arch).train())
    if arch == "bart":
        a, b = bart_pair(s, "right")
    else:
        batch = {"input_ids": IDS.masked_fill(MASK == 0, GPT2_PAD), "attention_mask": MASK,
                 "labels": IDS.masked_fill(MASK == 0, -100)}
        padded = {k: _pad(v, EXTRA, {"attention_mask": 0, "labels": -100}.get(k), False) for k, v in batch.items()}
        a = model_forward(s, batch).logits[MASK.bool()]
        b = model_forward(s, padded).logits[:, :T][MASK.bool()]
    assert torch.equal(a.detach(), b.detach())


# ----------------------------------------------------------------------------- generation
def _generate(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              output_scores=True, return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("kind", ["fp", "student", "attention", "int8"])
def test_gpt2_generation_from_left_padded_prompts(kind, exports):
    """Greedy decoding with the KV cache: the prompt step has left pads, every new step none."""
    model = model_under_test(kind, "gpt2", exports)
    mask = MASK.flip(1)
    ids = IDS.flip(1).masked_fill(mask == 0, GPT2_PAD)
    a = _generate(model, ids, mask, pad_token_id=GPT2_PAD)
    b = _generate(model, _pad(ids, EXTRA, None, True), _pad(mask, EXTRA, 0, True), pad_token_id=GPT2_PAD)
    assert torch.equal(a.sequences[:, T:], b.sequences[:, T + EXTRA:])
    # quantize_attention runs eager matmuls over all cached keys, pads included (their weights are
    # exactly 0): a longer reduction may be blocked differently and round one ulp apart (seen with
    # torch 2.13 / transformers 5.25); a pad that leaked would move the scores by orders more
    atol = 1e-6 if kind == "attention" else 0.0
    for x, y in zip(a.scores, b.scores, strict=True):
        torch.testing.assert_close(x, y, rtol=0.0, atol=atol)


@pytest.mark.parametrize("kind", ["fp", "student", "attention", "int8"])
def test_bart_beam_search_from_right_padded_sources(kind, exports):
    """The summarization evaluator's path: the encoder runs once on padded sources, the decoder's
    cross-attention reads them at every step (keys and values from the encoder's mask)."""
    model = model_under_test(kind, "bart", exports)
    ids = IDS.masked_fill(MASK == 0, BART_PAD)
    a = _generate(model, ids, MASK, num_beams=2)
    b = _generate(model, _pad(ids, EXTRA, None, False), _pad(MASK, EXTRA, 0, False), num_beams=2)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores, strict=True))


# ----------------------------------------------------------------------------- the rounding rule
@pytest.mark.parametrize("symmetric", [False, True])
def test_masked_minmax_codes_take_the_range_of_the_real_rows_only(symmetric):
    x = torch.tensor([[[-1.0, 2.0], [0.5, 0.25]], [[9.0, -7.0], [1.0, -0.5]]])  # [B=2, T=2, D=2]
    rows = torch.tensor([[True, True], [False, True]])  # x[1, 0] is a pad position
    codes, step, zero = minmax_activation_codes(x, 8, symmetric, rows.unsqueeze(-1))
    real = x[rows]
    ref_codes, ref_step, ref_zero = minmax_activation_codes(real, 8, symmetric)
    assert torch.equal(step, ref_step) and torch.equal(zero, ref_zero)
    assert step.item() == pytest.approx(2.0 / 127 if symmetric else 3.0 / 255)
    assert torch.equal(codes[rows], ref_codes)  # real rows: exactly the codes of the real rows alone
    # the pad row is clamped into the real range; a mask with no real row means the whole tensor
    assert codes[1, 0].tolist() == ([127.0, -127.0] if symmetric else [255.0, 0.0])
    none = minmax_activation_codes(x, 8, symmetric, torch.zeros(2, 2, 1, dtype=torch.bool))
    assert all(torch.equal(u, v) for u, v in zip(none, minmax_activation_codes(x, 8, symmetric), strict=True))
