"""The GPU path. Two halves:

- CUDA's own rules emulated on the CPU (always run): `torch._int_mm` on a GPU refuses what the CPU
  kernel takes (at most 16 rows, dimensions not multiples of 8: a generation step is one row), so
  qgplm.export.runtimes.int8.int_mm pads to them; these tests check, with the rules enforced on every call,
  that the padded product is exact.
- The same code on a CUDA device (skipped without one; experiments/gpu_check.sh runs them): the
  int8 linear at generation shapes, a quantized student's forward/backward under bf16 autocast, a
  short bf16-mixed fit with the memory bank on the GPU, and the export of a GPU-held student.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from qgplm.distill import soft_cross_entropy
from qgplm.export.runtimes import int8
from qgplm.quant import QuantConfig, initialize_quantizers, quantize_model, scale_parameters
from qgplm.quant.quantizers import ActivationQuantizer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (experiments/gpu_check.sh)")

# (rows, inner, cols): one generation row, a short prompt, CUDA's edge (17 rows), odd inner and
# output sizes (GPT-2's vocabulary, 50257, is odd), and a shape CUDA takes as it is
SHAPES = [(1, 768, 2304), (5, 64, 48), (16, 32, 32), (17, 24, 8), (3, 20, 13), (40, 64, 50257 % 97), (32, 64, 64)]


def _codes(*shape, seed=0):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def cuda_rules(monkeypatch):
    """enforce(): from then on every torch._int_mm call must meet CUDA's shape rules, and int_mm
    applies them on the CPU. Returns the shapes of the calls made."""
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def enforce():
        real = torch._int_mm

        def checked(a, b):
            assert int8.cuda_int_mm_ok(a, b), f"CUDA's _int_mm would refuse {tuple(a.shape)} x {tuple(b.shape)}"
            calls.append((tuple(a.shape), tuple(b.shape)))
            return real(a, b)

        monkeypatch.setattr(torch, "_int_mm", checked)
        monkeypatch.setattr(int8, "int_mm", functools.partial(int8.int_mm, cuda_rules=True))
        return calls

    return enforce


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int_mm_under_cuda_rules_is_the_exact_product(m, k, n, cuda_rules):
    a, b = _codes(m, k), _codes(n, k, seed=1).t()  # b as the layers pass it: a transposed view
    calls = cuda_rules()
    got = int8.int_mm(a, b)
    assert got.dtype == torch.int32 and got.shape == (m, n)
    assert torch.equal(got, a.int() @ b.int())
    assert len(calls) == 1


def test_cuda_rules_are_those_of_aten():
    """aten's _int_mm_out_cuda: self.size(0) > 16, self.size(1) % 8 == 0, mat2.size(1) % 8 == 0."""
    ok = int8.cuda_int_mm_ok
    assert ok(_codes(17, 8), _codes(8, 8)) and not ok(_codes(16, 8), _codes(8, 8))
    assert not ok(_codes(32, 12), _codes(12, 8)) and not ok(_codes(32, 8), _codes(8, 12))


def test_int_mm_copies_nothing_where_the_shapes_fit(monkeypatch):
    pads = []
    monkeypatch.setattr(int8.F, "pad", lambda *a, **k: pads.append(a) or torch.nn.functional.pad(*a, **k))
    int8.int_mm(_codes(32, 64), _codes(64, 64), cuda_rules=True)
    int8.int_mm(_codes(1, 20), _codes(20, 13), cuda_rules=False)  # CPU: any shape as it is
    assert pads == []


@pytest.mark.parametrize("rows", [1, 5, 17])
@pytest.mark.parametrize("head", [False, True], ids=["layer", "lm_head"])
def test_int8_linear_under_cuda_rules_equals_the_cpu_kernel(rows, head, cuda_rules):
    """Int8Linear (kernel int_mm, both operand orders: a layer and an LM-head-shaped one) gives the
    same result with CUDA's rules applied as without."""
    out, inp = (50 * 16 + 3, 24) if head else (40, 36)
    codes, step = _codes(out, inp), torch.rand(out, 1) * 0.01 + 1e-3
    act = ActivationQuantizer(8)
    layer = int8.Int8Linear(codes, step, torch.randn(out), act, kernel="int_mm")
    x = torch.randn(2, rows, inp)
    ref = layer(x)
    calls = cuda_rules()
    assert torch.equal(layer(x), ref) and len(calls) == 1


# --- on a CUDA device -------------------------------------------------------------------------


def _student(seed: int = 0):
    torch.manual_seed(seed)
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=101, n_positions=64,
                                         bos_token_id=0, eos_token_id=0)).eval()
    student = quantize_model(copy.deepcopy(teacher), QuantConfig(weight_bits=2, embedding_bits=2, activation_bits=8))
    initialize_quantizers(student)
    return teacher, student


@cuda
@pytest.mark.parametrize("rows", [1, 5, 17, 64])
@pytest.mark.parametrize("head", [False, True], ids=["layer", "lm_head"])
def test_int8_linear_on_cuda_at_generation_shapes(rows, head):
    out, inp = (50257, 768) if head else (2304, 768)
    codes, step = _codes(out, inp), torch.rand(out, 1) * 0.01 + 1e-3
    bias = torch.randn(out)
    act = ActivationQuantizer(8)
    x = torch.randn(1, rows, inp)
    ref = int8.Int8Linear(codes, step, bias, act, kernel="int_mm")(x)
    layer = int8.Int8Linear(codes.cuda(), step.cuda(), bias.cuda(), act, kernel="onednn")
    assert layer.kernel == "int_mm"  # oneDNN is a CPU kernel: a GPU layer falls back by itself
    got = layer(x.cuda())
    assert got.is_cuda and torch.allclose(got.cpu(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@cuda
def test_quantized_student_on_cuda_under_bf16_autocast():
    teacher, student = _student()
    x = torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t = teacher(x).logits
    ref = soft_cross_entropy(student(x).logits, t)
    teacher, student, x = teacher.cuda(), student.cuda(), x.cuda()
    with torch.no_grad():
        t = teacher(x).logits
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = soft_cross_entropy(student(x).logits, t)
    assert loss.dtype == torch.float32 and torch.allclose(loss.cpu(), ref, rtol=3e-2)
    loss.backward()
    gammas = scale_parameters(student)
    assert gammas and all(g.grad is not None and g.grad.dtype == torch.float32 and g.grad.is_cuda for g in gammas)
    assert all(torch.isfinite(g.grad).all() for g in gammas)


@cuda
def test_short_bf16_mixed_fit_on_cuda_matches_cpu_fp32():
    """trainer=gpu's precision on the GPU: losses within bf16's precision of CPU fp32, and the
    memory bank on the GPU in fp32."""
    from tests.test_bf16 import _fit

    ref, _ = _fit("32-true")
    got, module = _fit("bf16-mixed", accelerator="gpu")
    assert len(got) == len(ref) == 8
    for a, b in zip(got, ref, strict=True):
        assert abs(a - b) <= 0.03 * abs(b), (got, ref)
    bank = module.memory_bank.bank
    assert bank.dtype == torch.float32 and bool(module.memory_bank.filled.any())


@cuda
def test_export_of_a_student_held_on_cuda(tmp_path):
    from qgplm.export import export_model, load_quantized

    _, student = _student()
    x = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        ref = student.eval()(x).logits
    student = student.cuda()
    export_model(student, tmp_path / "exp")
    assert next(student.parameters()).is_cuda  # the caller's model stays where it was
    with torch.no_grad():
        got = load_quantized(tmp_path / "exp", mode="dequantize")(x).logits
    assert torch.allclose(got, ref, atol=1e-4)


@cuda
def test_per_step_bookkeeping_makes_no_host_sync():
    """What runs after every optimizer step (the scale clamp, the memory-bank update) queues GPU work
    only: torch's sync debug mode turns any device-to-host sync into an error."""
    from qgplm.distill import MemoryBank
    from qgplm.quant.quantizers import WeightQuantizer, clamp_scales_

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).cuda()
    student = quantize_model(model, QuantConfig(weight_bits=2, embedding_bits=2, activation_bits=8))
    initialize_quantizers(student)
    quantizers = [m for m in student.modules() if isinstance(m, WeightQuantizer)]
    bank = MemoryBank(64, 32).cuda()
    ids = torch.randint(0, 64, (2, 8), device="cuda")
    q, mask = torch.randn(2, 8, 32, device="cuda"), torch.rand(2, 8, device="cuda") > 0.2
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        flag = clamp_scales_(quantizers)
        bank.update(ids, q, mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not bool(flag) and bool(bank.filled[ids[mask]].all())
