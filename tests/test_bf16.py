"""The GPU path's precision (trainer=gpu: bf16-mixed) exercised on CPU with
torch.autocast("cpu", dtype=torch.bfloat16): every weight quantizer and its custom autograd
function, the activation quantizer, the quantized layers, the losses, the memory bank, one
distillation step, and a short Lightning run with precision=bf16-mixed against fp32."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from qgplm.distill import MemoryBank, soft_cross_entropy, token_contrastive_loss
from qgplm.quant import WEIGHT_QUANTIZERS, QuantConfig, initialize_quantizers, quantize_model, scale_parameters
from qgplm.quant.functional import minmax_activation_quantize
from qgplm.quant.quantizers import ActivationQuantizer
from qgplm.train.callbacks import MemoryBankCallback, ScaleWarmupCallback
from qgplm.train.config import DistillConfig, OptimConfig
from qgplm.train.module import DistillModule

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
CASES = [(name, bits) for name in sorted(WEIGHT_QUANTIZERS) for bits in (2, 4, 8)
         if bits in WEIGHT_QUANTIZERS[name].supported_bits]


def _quantizer(name: str, bits: int, w: torch.Tensor):
    q = WEIGHT_QUANTIZERS[name](bits)
    q.initialize(w.detach())
    if name == "laq":
        q.train()
    return q


def _fwd_bwd(q, w, g, autocast: bool):
    w = w.detach().clone().requires_grad_(True)
    for p in q.parameters():
        p.grad = None
    with torch.autocast(**BF16, enabled=autocast):
        out = q(w)
        loss = (out * g).sum()  # an elementwise op: not autocast, so out's dtype is the quantizer's
    loss.backward()
    return out, w.grad, [p.grad for p in q.parameters()]


@pytest.mark.parametrize("name,bits", CASES)
def test_weight_quantizer_is_unchanged_by_autocast(name, bits):
    """bf16-mixed keeps fp32 parameters: quantizer forward and backward (custom autograd
    functions included) must be exactly the fp32 ones, the scale's gradient fp32."""
    torch.manual_seed(0)
    w, g = torch.randn(16, 24) * 0.05, torch.randn(16, 24)
    ref = _fwd_bwd(_quantizer(name, bits, w), w, g, autocast=False)
    got = _fwd_bwd(_quantizer(name, bits, w), w, g, autocast=True)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    for a, b in zip(got[2], ref[2], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("name,bits", [c for c in CASES if c[1] == 2])
def test_weight_quantizer_takes_bf16_weights(name, bits):
    """bf16 parameters (trainer.precision=bf16-true, or FSDP's param_dtype): forward and backward
    run, the weight's gradient has the weight's dtype, the scale's gradient the scale's (fp32)."""
    torch.manual_seed(0)
    w = (torch.randn(16, 24) * 0.05).bfloat16()
    q = _quantizer(name, bits, w)
    out, gw, gs = _fwd_bwd(q, w, torch.randn(16, 24).bfloat16(), autocast=False)
    assert torch.isfinite(out).all() and gw.dtype == torch.bfloat16 and torch.isfinite(gw).all()
    ref = _quantizer(name, bits, w.float())(w.float())
    close = torch.isclose(out.float(), ref, rtol=1e-2, atol=1e-6)
    assert close.float().mean() > 0.97, close.float().mean()  # bf16 output rounding; a code may flip at a threshold
    for p, grad in zip(q.parameters(), gs, strict=True):
        if grad is not None:
            assert grad.dtype == p.dtype == torch.float32 and torch.isfinite(grad).all()


@pytest.mark.parametrize("symmetric", [False, True])
def test_activation_quantizer_under_autocast_quantizes_in_fp32(symmetric):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 32)
    xb = x.bfloat16().requires_grad_(True)
    out = minmax_activation_quantize(xb, 8, symmetric)
    assert out.dtype == torch.bfloat16
    # the fp32 quantization of the same values, rounded once to bf16
    assert torch.equal(out, minmax_activation_quantize(xb.detach().float(), 8, symmetric).bfloat16())
    out.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.equal(xb.grad, torch.ones_like(xb))  # STE: identity
    assert torch.equal(ActivationQuantizer(8, symmetric)(x), minmax_activation_quantize(x, 8, symmetric))


def _tiny_gpt2(vocab: int = 64) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()  # no dropout


@pytest.mark.parametrize("quantizer", ["quantgpt", "lsq", "pact"])
def test_quantized_model_under_autocast(quantizer):
    """Quantized Conv1D / embedding / tied head in bf16 autocast: bf16 logits, fp32 gradients for
    every weight and scale, and logits close to the fp32 forward."""
    model = quantize_model(_tiny_gpt2(), QuantConfig(weight_bits=2, embedding_bits=2, activation_bits=8,
                                                     quantizer=quantizer))
    initialize_quantizers(model)
    x = torch.randint(0, 64, (2, 16))
    ref = model(x).logits
    with torch.autocast(**BF16):
        logits = model(x).logits
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - ref).norm() < 0.03 * ref.norm()  # measured: 0.7-0.9% (FP model: 0.3%)
    logits.float().logsumexp(-1).mean().backward()
    for p in model.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all()
    assert all(p.grad.abs().sum() > 0 for p in scale_parameters(model))


def test_losses_are_fp32_under_autocast():
    torch.manual_seed(0)
    s, t = torch.randn(2, 8, 50), torch.randn(2, 8, 50)
    h, ht = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    ids = torch.randint(0, 10, (2, 8))
    kd_ref, cont_ref = soft_cross_entropy(s, t), token_contrastive_loss(h, ht, ids)
    with torch.autocast(**BF16):
        sb = (s @ torch.eye(50)).requires_grad_(True)  # bf16, as the LM head's output under autocast
        hb = h.bfloat16().requires_grad_(True)
        kd = soft_cross_entropy(sb, t.bfloat16())
        cont = token_contrastive_loss(hb, ht, ids)
        cont_fp32_inputs = token_contrastive_loss(h, ht, ids)
    assert sb.dtype == torch.bfloat16
    assert kd.dtype == torch.float32 and cont.dtype == torch.float32
    assert torch.equal(cont_fp32_inputs, cont_ref)  # the einsums ran in fp32, not as bf16 matmuls
    assert torch.allclose(kd, kd_ref, rtol=2e-2) and torch.allclose(cont, cont_ref, rtol=2e-2)
    (kd + cont).backward()
    assert sb.grad.dtype == torch.bfloat16 and hb.grad.dtype == torch.bfloat16


def test_memory_bank_stays_fp32_under_autocast():
    bank = MemoryBank(10, 4, momentum=0.5)
    ids = torch.tensor([[1, 2, 2]])
    h = torch.randn(1, 3, 4)
    with torch.autocast(**BF16):
        hb = h.bfloat16().requires_grad_(True)
        q = bank.query(hb, ids)
        assert q.dtype == torch.float32
        bank.update(ids, q)
        q2 = bank.query(hb, ids)
    assert bank.bank.dtype == torch.float32 and q2.dtype == torch.float32
    # the row keeps fp32 precision: m * M[t] + (1 - m) * h, with M[t] the fp32 mean of the first queries
    want = 0.5 * bank.bank[ids] + 0.5 * hb.detach().float()
    assert torch.equal(q2.detach(), want)
    q2.sum().backward()
    assert hb.grad.dtype == torch.bfloat16 and torch.equal(hb.grad.float(), torch.full((1, 3, 4), 0.5))


def _module(contrastive: float = 0.1) -> DistillModule:
    teacher = _tiny_gpt2()
    student = quantize_model(copy.deepcopy(teacher), QuantConfig(weight_bits=2, embedding_bits=2,
                                                                 activation_bits=8))
    module = DistillModule(student, teacher, DistillConfig(contrastive_weight=contrastive), OptimConfig(lr=1e-3), 10)
    module.log = lambda *a, **k: None
    return module


def test_distill_step_under_autocast():
    module = _module()
    initialize_quantizers(module.student)
    bank = MemoryBank(64, 32)
    module.attach_memory_bank(bank)
    x = torch.randint(0, 64, (2, 16))
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    ref = module.training_step(batch, 0)
    module.pop_bank_update()
    with torch.autocast(**BF16):
        loss = module.training_step(batch, 0)
    assert loss.dtype == torch.float32 and torch.allclose(loss, ref, rtol=2e-2)
    loss.backward()
    gammas = scale_parameters(module.student)
    assert gammas and all(g.grad.dtype == torch.float32 and torch.isfinite(g.grad).all() for g in gammas)
    ids, q, mask = module.pop_bank_update()
    assert q.dtype == torch.float32
    bank.update(ids, q, mask)
    assert bank.bank.dtype == torch.float32


class _Losses(pl.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit(precision: str, steps: int = 8, accelerator: str = "cpu") -> tuple[list[float], DistillModule]:
    torch.manual_seed(0)
    module = _module()
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": (x := torch.randint(0, 64, (4, 16), generator=gen)), "attention_mask": torch.ones_like(x),
             "labels": x} for _ in range(steps)]
    losses = _Losses()
    trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[ScaleWarmupCallback(), MemoryBankCallback(0.5), losses])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return losses.losses, module


def test_short_run_bf16_mixed_matches_fp32():
    """trainer.precision=bf16-mixed (trainer=gpu's) on CPU: same losses as fp32 within bf16's
    precision, fp32 parameters, scales and bank."""
    ref, _ = _fit("32-true")
    got, module = _fit("bf16-mixed")
    assert len(got) == len(ref) == 8
    for a, b in zip(got, ref, strict=True):
        assert abs(a - b) <= 0.03 * abs(b), (got, ref)
    assert len(set(got)) > 1  # the student moves
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert module.memory_bank.bank.dtype == torch.float32 and bool(module.memory_bank.filled.any())
