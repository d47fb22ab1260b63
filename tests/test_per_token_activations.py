"""Per-token 8-bit activations (`activation_granularity="token"`): the rounding rule against hand
values, its independence from other tokens (outliers, padding), and every consumer of the rule
reproducing the student: the export manifest, the dequantize and int8 loaders, and the ONNX graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qgplm.errors import QgplmError
from qgplm.export import export_model, load_quantized
from qgplm.quant import QuantConfig, initialize_quantizers, quantize_model
from qgplm.quant.functional import minmax_activation_codes, minmax_activation_quantize
from qgplm.quant.quantizers import ActivationQuantizer
from tests.test_export import IDS, logits, student, tiny_gpt2

# row 0 is test_quant_functional's X; row 1 is X * 10 + 3 (an "outlier token")
X0 = [-0.9, 0.25, 0.62, 1.43, 2.0]
X1 = [-6.0, 5.5, 9.2, 17.3, 23.0]
# 2 bits, asymmetric, row 0: step 2.9/3 = 0.966667, zero = round(0.931) = 1
#   x/step = [-0.931, 0.259, 0.641, 1.479, 2.069] -> codes [0, 1, 2, 2, 3] -> (codes - 1) * step
ROW0_ASYM2 = [-0.966666667, 0.0, 0.966666667, 0.966666667, 1.933333333]
# row 1: step 29/3 = 9.666667, zero = round(0.621) = 1
#   x/step = [-0.621, 0.569, 0.952, 1.790, 2.379] -> codes [0, 2, 2, 3, 3]
ROW1_ASYM2 = [-9.666666667, 9.666666667, 9.666666667, 19.333333333, 19.333333333]
# 4 bits, symmetric, row 0: n 7, step 2/7; x/step = [-3.15, 0.875, 2.17, 5.005, 7] -> [-3, 1, 2, 5, 7]
ROW0_SYM4 = [-0.857142857, 0.285714286, 0.571428571, 1.428571429, 2.0]
# row 1: step 23/7; x/step = [-1.826, 1.674, 2.8, 5.265, 7] -> [-2, 2, 3, 5, 7]
ROW1_SYM4 = [-6.571428571, 6.571428571, 9.857142857, 16.428571429, 23.0]


def test_per_token_hand_values():
    x = torch.tensor([X0, X1])
    torch.testing.assert_close(minmax_activation_quantize(x, 2, granularity="token"),
                               torch.tensor([ROW0_ASYM2, ROW1_ASYM2]), rtol=0, atol=1e-5)
    torch.testing.assert_close(minmax_activation_quantize(x, 4, symmetric=True, granularity="token"),
                               torch.tensor([ROW0_SYM4, ROW1_SYM4]), rtol=0, atol=1e-5)
    codes, step, zero = minmax_activation_codes(x, 2, granularity="token")
    assert codes.tolist() == [[0, 1, 2, 2, 3], [0, 2, 2, 3, 3]]
    assert step.shape == zero.shape == (2, 1) and zero.tolist() == [[1.0], [1.0]]


@pytest.mark.parametrize("symmetric", [False, True])
def test_each_token_is_quantized_as_if_alone(symmetric):
    """A token's result is the per-tensor rule on that token alone: an outlier token changes no other."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 16)
    x[1, 2] *= 100
    out = minmax_activation_quantize(x, 8, symmetric, granularity="token")
    for i in range(3):
        for t in range(4):
            assert torch.equal(out[i, t], minmax_activation_quantize(x[i, t], 8, symmetric))
    # per tensor, the outlier coarsens every token's step; per token the other tokens keep theirs
    per_tensor = minmax_activation_quantize(x, 8, symmetric)
    others = torch.ones(3, 4, dtype=torch.bool)
    others[1, 2] = False
    assert (out - x).abs()[others].max() < (per_tensor - x).abs()[others].max() / 20


@pytest.mark.parametrize("symmetric", [False, True])
def test_per_token_gradient_is_identity_and_bf16_rounds_once(symmetric):
    torch.manual_seed(1)
    x = torch.randn(3, 7, requires_grad=True)
    g = torch.randn(3, 7)
    minmax_activation_quantize(x, 4, symmetric, granularity="token").backward(g)
    assert torch.equal(x.grad, g)
    xb = torch.randn(2, 5, 9).bfloat16()
    assert torch.equal(minmax_activation_quantize(xb, 8, symmetric, granularity="token"),
                       minmax_activation_quantize(xb.float(), 8, symmetric, granularity="token").bfloat16())


def test_activation_quantizer_spec_round_trip_and_old_manifests():
    aq = ActivationQuantizer(8, symmetric=True, granularity="token")
    assert aq.spec() == {"bits": 8, "symmetric": True, "granularity": "token"}
    assert ActivationQuantizer.from_spec(aq.spec()).spec() == aq.spec()
    # an export written before the option existed was per tensor
    assert ActivationQuantizer.from_spec({"bits": 8, "symmetric": False}).granularity == "tensor"
    with pytest.raises(ValueError, match="granularity"):
        ActivationQuantizer(8, granularity="row")


def test_per_token_ignores_the_token_mask():
    """Per tensor, padding rows are masked out of the range; per token there is nothing to mask."""
    torch.manual_seed(2)
    x = torch.randn(2, 6, 8)
    aq = ActivationQuantizer(8, granularity="token")
    mask = torch.zeros(2, 6, 1, dtype=torch.bool)
    assert torch.equal(aq(x, mask), aq(x))


def test_quantize_model_gives_every_activation_quantizer_the_granularity():
    s = student("gpt2", 2, activation_granularity="token", quantize_attention=True)
    aqs = [m for m in s.modules() if isinstance(m, ActivationQuantizer)]
    assert len(aqs) > 4 and {a.granularity for a in aqs} == {"token"}


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_loaders_reproduce_a_per_token_student(tmp_path, arch):
    s = student(arch, 2, activation_granularity="token")
    export_model(s, tmp_path / "e")
    ref = logits(s, arch, IDS)
    scale = ref.abs().max()
    deq = load_quantized(tmp_path / "e", mode="dequantize")
    assert {m.granularity for m in deq.modules() if isinstance(m, ActivationQuantizer)} == {"token"}
    assert torch.equal(logits(deq, arch, IDS), ref)
    int8 = load_quantized(tmp_path / "e", mode="int8")
    assert {m.act_granularity for m in int8.modules() if hasattr(m, "act_granularity")} == {"token"}
    torch.testing.assert_close(logits(int8, arch, IDS), ref, rtol=0, atol=1e-4 * scale)
    # the per-tensor student differs: the option reaches the loaders, it is not ignored
    s_tensor = student(arch, 2)
    assert not torch.allclose(logits(s_tensor, arch, IDS), ref, rtol=0, atol=1e-4 * scale)


def _fp_weight_student(granularity: str) -> torch.nn.Module:
    """FP linear weights with 8-bit inputs (exported as FP layers the graph fake-quantizes) and
    quantized attention matmuls; only the 2-bit tied table runs on MatMulNBits."""
    s = quantize_model(tiny_gpt2(), QuantConfig(weight_bits=None, embedding_bits=2, activation_bits=8,
                                                activation_granularity=granularity, quantize_attention=True))
    initialize_quantizers(s)
    return s


def test_onnx_graph_reproduces_per_token_fake_quantization(tmp_path):
    """The graph's per-token fake quantization (linear inputs, and attention's queries, keys stored
    transposed, probabilities and values) equals lowbit mode's, which runs the student's rule in
    torch around the same MatMulNBits LM head; per-tensor would differ."""
    from qgplm.export.converters.onnx import export_onnx
    from tests.test_onnx_export import feed_of, ort_run

    export_model(_fp_weight_student("token"), tmp_path / "p")
    export_onnx(tmp_path / "p", tmp_path / "o")
    got = ort_run(tmp_path, tmp_path / "o", "logits", **feed_of("gpt2", IDS, torch.ones_like(IDS)))["logits"]
    ref = logits(load_quantized(tmp_path / "p", mode="lowbit"), "gpt2", IDS).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    export_model(_fp_weight_student("tensor"), tmp_path / "t")
    per_tensor = logits(load_quantized(tmp_path / "t", mode="lowbit"), "gpt2", IDS).numpy()
    assert np.abs(per_tensor - got).max() > 1e-3 * np.abs(ref).max()


def test_unknown_granularity_is_one_error_line():
    from qgplm.train.config import MethodConfig

    with pytest.raises(QgplmError, match="method.activation_granularity='row' is not valid: choose one of tensor, "
                                         "token"):
        MethodConfig(name="quantgpt", activation_granularity="row").validate()
