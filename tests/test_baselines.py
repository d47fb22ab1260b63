"""Baseline quantizers (PACT, LSQ, LAQ, TWN, min-max, QuantGPT with PACT's gradient): forward and
backward against hand-computed values, export codes, initialisation, LAQ's curvature callback, use
through `quantize_model`, and their Hydra method configs.

Shared hand example (the one of test_quant_functional.py):
    w = [0.5, -1.2, 0.1, 2.0, -0.05, 0.8]      mean|w| = 0.775, max|w| = 2.0
    g = [1, 2, -1, 0.5, 3, -2]                 (upstream gradient)
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import qgplm.quant.baselines  # noqa: F401  (registers the baselines)
from qgplm.errors import QgplmError
from qgplm.quant import (
    WEIGHT_QUANTIZERS,
    QuantConfig,
    QuantConv1D,
    initialize_quantizers,
    quantize_model,
    quantized_modules,
    scale_parameters,
)
from qgplm.quant.api import oriented_weight
from qgplm.quant.baselines import (
    LAQQuantizer,
    LSQQuantizer,
    MinMaxQuantizer,
    PACTGradDynamicScaleQuantizer,
    PACTQuantizer,
    TWNQuantizer,
    laq_alpha_step,
    lsq_quantize,
    pact_quantize,
)
from qgplm.train.callbacks.laq import LAQCurvatureCallback
from qgplm.train.config import RunConfig
from tests.conftest import compose_cfg

F64 = torch.float64
W = [0.5, -1.2, 0.1, 2.0, -0.05, 0.8]
G = [1.0, 2.0, -1.0, 0.5, 3.0, -2.0]
TOL = dict(rtol=0, atol=1e-12)


def _t(values, grad=False):
    return torch.tensor(values, dtype=F64, requires_grad=grad)


# ====================================================================================== PACT
# alpha = 0.9: clipped (|w| > 0.9) are -1.2 and 2.0 (indices 1, 3)
#   dL/dw     = g inside, 0 clipped                     = [1, 0, -1, 0, 3, -2]
#   dL/dalpha = sum_clipped g*sign(w) = 2*(-1) + 0.5*(+1) = -1.5  (same at every bit-width;
#               the inside elements contribute nothing, unlike QuantGPT's round(u n)/n - u term)
#   u = clip(w)/0.9 = [0.5556, -1, 0.1111, 1, -0.0556, 0.8889]
PACT_HAND = {
    # n = 1: codes round(u) = [1, -1, 0, 1, 0, 1], step 0.9
    2: dict(codes=[1, -1, 0, 1, 0, 1], wq=[0.9, -0.9, 0.0, 0.9, 0.0, 0.9]),
    # n = 7: u*7 = [3.889, -7, 0.778, 7, -0.389, 6.222] -> [4, -7, 1, 7, 0, 6], step 0.9/7 = 0.128571
    4: dict(codes=[4, -7, 1, 7, 0, 6],
            wq=[0.514285714285714, -0.9, 0.128571428571429, 0.9, 0.0, 0.771428571428571]),
    # n = 127: u*127 = [70.56, -127, 14.11, 127, -7.06, 112.89] -> [71, -127, 14, 127, -7, 113]
    8: dict(codes=[71, -127, 14, 127, -7, 113],
            wq=[71 * 0.9 / 127, -0.9, 14 * 0.9 / 127, 0.9, -7 * 0.9 / 127, 113 * 0.9 / 127]),
}


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pact_forward_backward_hand_values(bits):
    w, alpha = _t(W, grad=True), _t(0.9, grad=True)
    wq = pact_quantize(w, alpha, bits)
    torch.testing.assert_close(wq, _t(PACT_HAND[bits]["wq"]), **TOL)
    wq.backward(_t(G))
    torch.testing.assert_close(w.grad, _t([1.0, 0.0, -1.0, 0.0, 3.0, -2.0]), rtol=0, atol=0)
    torch.testing.assert_close(alpha.grad, _t(-1.5), **TOL)


def test_pact_alpha_grad_is_zero_when_nothing_clipped():
    """alpha = 2.5 > max|w|: no clipped element, so dL/dalpha = 0 (QuantGPT's would not be)."""
    w, alpha = _t(W, grad=True), _t(2.5, grad=True)
    pact_quantize(w, alpha, 4).backward(_t(G))
    assert alpha.grad.item() == 0.0
    torch.testing.assert_close(w.grad, _t(G), rtol=0, atol=0)


def test_pact_per_row_hand_values():
    """Rows [0.5, -1.2, 0.1] (alpha 0.9) and [2.0, -0.05, 0.8] (alpha 1.0), 2 bits.
    Row 0: codes [1, -1, 0], clipped -1.2 -> dalpha0 = 2 * (-1) = -2
    Row 1: codes [1, 0, 1], clipped 2.0   -> dalpha1 = 0.5 * (+1) = 0.5"""
    w = _t([[0.5, -1.2, 0.1], [2.0, -0.05, 0.8]], grad=True)
    alpha = _t([0.9, 1.0], grad=True)
    wq = pact_quantize(w, alpha, 2, per_row=True)
    torch.testing.assert_close(wq, _t([[0.9, -0.9, 0.0], [1.0, 0.0, 1.0]]), **TOL)
    wq.backward(_t([[1.0, 2.0, -1.0], [0.5, 3.0, -2.0]]))
    torch.testing.assert_close(alpha.grad, _t([-2.0, 0.5]), **TOL)
    torch.testing.assert_close(w.grad, _t([[1.0, 0.0, -1.0], [0.0, 3.0, -2.0]]), rtol=0, atol=0)


def test_pact_initialisation_defaults_and_clamp():
    w = _t(W)
    q = PACTQuantizer(2).double()
    assert not bool(q.initialized)
    q.initialize(w)
    assert bool(q.initialized)
    assert q.alpha.item() == pytest.approx(1.4 * 0.775, abs=1e-12)  # QuantGPT's fixed multiple
    q4 = PACTQuantizer(4).double()
    q4.initialize(w)
    assert q4.alpha.item() == pytest.approx(3.0 * 0.775, abs=1e-12)
    q8 = PACTQuantizer(8).double()
    q8.initialize(w)
    assert q8.alpha.item() >= 2.0 and q8.alpha.item() == pytest.approx(2.0, abs=1e-12)  # max|w|
    qa = PACTQuantizer(2, init_alpha=0.3).double()
    qa.initialize(w)
    assert qa.alpha.item() == pytest.approx(0.3)
    qs = PACTQuantizer(2, num_rows=2, init_scale=2.0).double()
    qs.initialize(_t([[0.5, -1.2, 0.1], [2.0, -0.05, 0.8]]))
    torch.testing.assert_close(qs.alpha.detach(), _t([1.2, 1.9]), **TOL)  # 2 * row means 0.6, 0.95
    with torch.no_grad():
        q.alpha.fill_(-0.1)
    assert q.clamp_() and q.alpha.item() == pytest.approx(1e-6)
    assert not q.clamp_()
    assert q.scale_parameters() == [q.alpha]
    assert "init_scale=None" in repr(q)


# ====================================================================================== LSQ
# s = 0.25: v = w/s = [2, -4.8, 0.4, 8, -0.2, 3.2] (all exact in binary but -4.8, 0.4, -0.2, 3.2)
LSQ_HAND = {
    # Q_n = 2, Q_p = 1: inside [-2, 1] only 0.4 and -0.2 (indices 2, 4)
    #   codes = [1, -2, 0, 1, 0, 1] (bounds outside), w_q = codes * 0.25
    #   dL/dw = [0, 0, -1, 0, 3, 0]
    #   ds terms: [1, -2, 0-0.4, 1, 0+0.2, 1]; sum g*term = 1 - 4 + 0.4 + 0.5 + 0.6 - 2 = -3.5
    #   g_s = 1/sqrt(6 * 1): dL/ds = -3.5/sqrt(6) = -1.428869016623521
    2: dict(codes=[1, -2, 0, 1, 0, 1], wq=[0.25, -0.5, 0.0, 0.25, 0.0, 0.25],
            dw=[0.0, 0.0, -1.0, 0.0, 3.0, 0.0], ds=-1.428869016623521),
    # Q_n = 8, Q_p = 7: only v = 8 (index 3) clipped, to 7
    #   codes = [2, -5, 0, 7, 0, 3], w_q = [0.5, -1.25, 0, 1.75, 0, 0.75]
    #   dL/dw = [1, 2, -1, 0, 3, -2]
    #   ds terms: [2-2, -5+4.8, 0-0.4, 7, 0+0.2, 3-3.2] = [0, -0.2, -0.4, 7, 0.2, -0.2]
    #   sum g*term = 0 - 0.4 + 0.4 + 3.5 + 0.6 + 0.4 = 4.5; dL/ds = 4.5/sqrt(42) = 0.694365074829...
    4: dict(codes=[2, -5, 0, 7, 0, 3], wq=[0.5, -1.25, 0.0, 1.75, 0.0, 0.75],
            dw=[1.0, 2.0, -1.0, 0.0, 3.0, -2.0], ds=0.694365074829414),
    # Q_n = 128, Q_p = 127: all inside; codes = [2, -5, 0, 8, 0, 3]
    #   ds terms: [0, -0.2, -0.4, 0, 0.2, -0.2]; sum g*term = -0.4 + 0.4 + 0.6 + 0.4 = 1.0
    #   dL/ds = 1 / sqrt(6 * 127) = 0.036226177800...
    8: dict(codes=[2, -5, 0, 8, 0, 3], wq=[0.5, -1.25, 0.0, 2.0, 0.0, 0.75],
            dw=G, ds=0.036226177800111),
}


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_forward_backward_hand_values(bits):
    hand = LSQ_HAND[bits]
    w, s = _t(W, grad=True), _t(0.25, grad=True)
    wq = lsq_quantize(w, s, bits)
    torch.testing.assert_close(wq, _t(hand["wq"]), **TOL)
    wq.backward(_t(G))
    torch.testing.assert_close(w.grad, _t(hand["dw"]), rtol=0, atol=0)
    torch.testing.assert_close(s.grad, _t(hand["ds"]), **TOL)


def test_lsq_symmetric_b2_forward_backward_hand_values():
    """symmetric: Q_n = Q_p = 1 (ternary). v = [2, -4.8, 0.4, 8, -0.2, 3.2]: inside only 0.4, -0.2
    codes = [1, -1, 0, 1, 0, 1]; dL/dw = [0, 0, -1, 0, 3, 0]
    ds terms [1, -1, -0.4, 1, 0.2, 1]; sum g*term = 1 - 2 + 0.4 + 0.5 + 0.6 - 2 = -1.5
    dL/ds = -1.5 / sqrt(6 * 1) = -0.612372435695794"""
    w, s = _t(W, grad=True), _t(0.25, grad=True)
    wq = lsq_quantize(w, s, 2, symmetric=True)
    torch.testing.assert_close(wq, _t([0.25, -0.25, 0.0, 0.25, 0.0, 0.25]), **TOL)
    wq.backward(_t(G))
    torch.testing.assert_close(w.grad, _t([0.0, 0.0, -1.0, 0.0, 3.0, 0.0]), rtol=0, atol=0)
    torch.testing.assert_close(s.grad, _t(-0.612372435695794), **TOL)
    q = LSQQuantizer(2, symmetric=True).double()
    q.initialize(_t(W))
    assert q.step.item() == pytest.approx(1.55, abs=1e-12)  # 2 mean|w| / sqrt(1)
    assert sorted(torch.unique(q.codes(torch.linspace(-5, 5, 101, dtype=F64))[0]).tolist()) == [-1.0, 0.0, 1.0]


def test_lsq_b2_levels_are_asymmetric():
    q = LSQQuantizer(2).double()
    with torch.no_grad():
        q.step.fill_(0.1)
    codes, step = q.codes(torch.linspace(-1, 1, 101, dtype=F64))
    assert sorted(torch.unique(codes).tolist()) == [-2.0, -1.0, 0.0, 1.0]


def test_lsq_per_row_uses_row_count_in_grad_scale():
    """Rows [0.5, -1.2, 0.1] and [2.0, -0.05, 0.8], s = [0.25, 0.5], 4 bits (Q_p = 7, N = 3 per row).
    Row 0: v = [2, -4.8, 0.4] -> codes [2, -5, 0]; terms [0, -0.2, -0.4]; g.terms = -0.4 + 0.4 = 0
    Row 1: v = [4, -0.1, 1.6] -> codes [4, 0, 2]; terms [0, 0.1, 0.4]; g.terms = 0.3 - 0.8 = -0.5
    dL/ds = [0, -0.5/sqrt(21)] = [0, -0.109108945117996]"""
    w = _t([[0.5, -1.2, 0.1], [2.0, -0.05, 0.8]], grad=True)
    s = _t([0.25, 0.5], grad=True)
    wq = lsq_quantize(w, s, 4, per_row=True)
    torch.testing.assert_close(wq, _t([[0.5, -1.25, 0.0], [2.0, 0.0, 1.0]]), **TOL)
    wq.backward(_t([[1.0, 2.0, -1.0], [0.5, 3.0, -2.0]]))
    torch.testing.assert_close(s.grad, _t([0.0, -0.109108945117996]), **TOL)


def test_lsq_initialisation():
    """s_0 = 2 mean|w| / sqrt(Q_p): 2 bits 1.55 / 1, 4 bits 1.55 / sqrt(7) = 0.585845"""
    for bits, expect in ((2, 1.55), (4, 0.585844933164302), (8, 1.55 / 127**0.5)):
        q = LSQQuantizer(bits).double()
        q.initialize(_t(W))
        assert bool(q.initialized)
        assert q.step.item() == pytest.approx(expect, abs=1e-12)
    q = LSQQuantizer(2).double()
    with torch.no_grad():
        q.step.fill_(0.0)
    assert q.clamp_() and q.step.item() == pytest.approx(1e-8)


# ====================================================================================== LAQ
# 2 bits (n = 1), D = identity, from alpha = 0.9, iters = 2:
#   b(0.9)  = round(clip(w/0.9)) = [1, -1, 0, 1, 0, 1] -> alpha = (0.5+1.2+2.0+0.8)/4 = 1.125
#   b(1.125)= w/1.125 = [0.44, -1.07, 0.09, 1.78, -0.04, 0.71] -> [0, -1, 0, 1, 0, 1]
#           -> alpha = (1.2+2.0+0.8)/3 = 4/3 (a fixed point: b(4/3) = [0, -1, 0, 1, 0, 1] again)
#   w_q = 4/3 * [0, -1, 0, 1, 0, 1]; STE: inside |w| <= 4/3 is all but 2.0 -> dL/dw = [1,2,-1,0,3,-2]


def _laq(bits, alpha0, iters=2, d=None, num_rows=None):
    q = LAQQuantizer(bits, num_rows=num_rows, iters=iters).double()
    with torch.no_grad():
        q.alpha.copy_(torch.as_tensor(alpha0, dtype=F64))
    q.initialized.fill_(True)
    if d is not None:
        q.set_curvature(_t(d))
    return q


def test_laq_identity_curvature_closed_form_2bit():
    q = _laq(2, 0.9, iters=1)
    w = _t(W, grad=True)
    wq = q(w)
    assert q.alpha.item() == pytest.approx(1.125, abs=1e-12)
    torch.testing.assert_close(wq, _t([0.0, -1.125, 0.0, 1.125, 0.0, 1.125]), **TOL)
    q2 = _laq(2, 0.9, iters=2)
    w2 = _t(W, grad=True)
    wq2 = q2(w2)
    assert q2.alpha.item() == pytest.approx(4 / 3, abs=1e-12)
    torch.testing.assert_close(wq2, _t([0.0, -4 / 3, 0.0, 4 / 3, 0.0, 4 / 3]), **TOL)
    wq2.backward(_t(G))
    torch.testing.assert_close(w2.grad, _t([1.0, 2.0, -1.0, 0.0, 3.0, -2.0]), rtol=0, atol=0)
    assert q2.scale_parameters() == [] and list(q2.parameters()) == []


def test_laq_identity_curvature_closed_form_4bit():
    """n = 7, from 0.9, iters = 1 (least squares: alpha = sum b w / sum b^2):
    b(0.9) = round(clip(w/0.9)*7)/7 = [4, -7, 1, 7, 0, 6]/7
    alpha  = (4*0.5 + 7*1.2 + 0.1 + 7*2.0 + 6*0.8) * 7 / (16+49+1+49+36) = 205.1 / 151 = 1.358278...
    (the paper's sum|b w| / sum|b| = 29.3 / 25 = 1.172 would clip far more)
    final codes: w/alpha*7 = [2.577, -6.185, 0.515, 10.3, -0.258, 4.123] -> [3, -6, 1, 7, 0, 4]
    STE: clipped |w| > alpha is only 2.0."""
    q = _laq(4, 0.9, iters=1)
    w = _t(W, grad=True)
    wq = q(w)
    alpha = 205.1 / 151
    assert q.alpha.item() == pytest.approx(alpha, abs=1e-12)
    torch.testing.assert_close(wq, _t([3, -6, 1, 7, 0, 4]) * (alpha / 7), **TOL)
    wq.backward(_t(G))
    torch.testing.assert_close(w.grad, _t([1.0, 2.0, -1.0, 0.0, 3.0, -2.0]), rtol=0, atol=0)
    codes, step = q.codes(w)
    assert codes.tolist() == [3, -6, 1, 7, 0, 4]
    assert torch.equal(codes * step, wq.detach())


def test_laq_curvature_moves_alpha_toward_high_curvature_elements():
    """D = [1, 1, 1, 100, 1, 1] (2.0 is the high-curvature weight), 2 bits, from 0.9, iters = 2:
    b(0.9) = [1, -1, 0, 1, 0, 1] -> alpha = (0.5 + 1.2 + 200 + 0.8) / 103 = 202.5/103 = 1.966019
    b(1.966) = [0, -1, 0, 1, 0, 0] (0.8/1.966 = 0.41 rounds to 0) -> alpha = 201.2/101 = 1.992079
    vs 4/3 with D = identity: alpha moves toward |w| = 2.0."""
    d = [1.0, 1.0, 1.0, 100.0, 1.0, 1.0]
    q = _laq(2, 0.9, iters=1, d=d)
    q(_t(W))
    assert q.alpha.item() == pytest.approx(202.5 / 103, abs=1e-12)
    q = _laq(2, 0.9, iters=2, d=d)
    wq = q(_t(W))
    assert q.alpha.item() == pytest.approx(201.2 / 101, abs=1e-12)
    torch.testing.assert_close(wq, _t([0.0, -1.0, 0.0, 1.0, 0.0, 0.0]) * (201.2 / 101), **TOL)
    ident = _laq(2, 0.9, iters=2)
    ident(_t(W))
    assert abs(q.alpha.item() - 2.0) < abs(ident.alpha.item() - 2.0)
    # low curvature on 2.0 instead pulls alpha away from it
    low = _laq(2, 0.9, iters=2, d=[1.0, 1.0, 1.0, 0.01, 1.0, 1.0])
    low(_t(W))
    assert low.alpha.item() < ident.alpha.item()


@pytest.mark.parametrize("bits", [2, 4])
def test_laq_alternation_converges(bits):
    torch.manual_seed(bits)
    w = torch.randn(16, 24, dtype=F64) * 0.05
    d = torch.rand(16, 24, dtype=F64) + 0.1
    n = 2 ** (bits - 1) - 1
    alpha = w.abs().amax()

    def objective(a):  # sum D (w - a b)^2, which every alternation decreases (exact block minimisation)
        b = torch.round(torch.clamp(w / a, -1, 1) * n) / n
        return (d * (w - a * b) ** 2).sum().item()

    history = [alpha.item()]
    for _ in range(60):
        alpha = laq_alpha_step(w, alpha, n, d, per_row=False)
        history.append(alpha.item())
    assert history[-1] == history[-2] == history[-3]  # reached a fixed point
    assert laq_alpha_step(w, alpha, n, d, per_row=False).item() == alpha.item()
    objs = [objective(torch.tensor(a, dtype=F64)) for a in history[1:]]
    assert all(b <= a + 1e-12 for a, b in zip(objs, objs[1:], strict=False))
    # the quantizer continues from its stored alpha at each step (a new weight value): more steps,
    # same fixed point; a second forward of the same weight does not solve again
    q = LAQQuantizer(bits, iters=3).double()
    q.set_curvature(d)
    q(w)
    first = q.alpha.clone()
    q(w)
    assert torch.equal(q.alpha, first)
    for _ in range(25):
        w.mul_(1.0)  # an in-place update (what the optimizer step does): a new step, same values
        q(w)
    assert q.alpha.item() == pytest.approx(history[-1], abs=1e-12)


def test_laq_initialisation_eval_freeze_and_codes():
    """w = [0.5, -1.2, 0.1, 2.0, -0.05, 0.9], 2 bits, D = identity, from alpha = max|w| = 2:
    w/2   = [0.25, -0.6, 0.05, 1, -0.025, 0.45]     -> b = [0, -1, 0, 1, 0, 0] -> alpha = 3.2/2 = 1.6
    w/1.6 = [0.31, -0.75, 0.06, 1.25, -0.03, 0.5625] -> b = [0, -1, 0, 1, 0, 1] -> alpha = 4.1/3
    w/1.3667 = [0.37, -0.88, 0.07, 1.46, -0.04, 0.66] -> same b: fixed point 4.1/3 = 1.366667"""
    q = LAQQuantizer(2).double()
    assert q.alpha.item() == 0.0
    q.initialize(_t([0.5, -1.2, 0.1, 2.0, -0.05, 0.9]))
    assert bool(q.initialized)
    assert q.alpha.item() == pytest.approx(4.1 / 3, abs=1e-12)
    one = LAQQuantizer(2, init_iters=1).double()
    one.initialize(_t([0.5, -1.2, 0.1, 2.0, -0.05, 0.9]))
    assert one.alpha.item() == pytest.approx(1.6, abs=1e-12)
    q.eval()
    with torch.no_grad():
        q.alpha.fill_(0.9)
    out = q(_t(W))
    assert q.alpha.item() == 0.9  # frozen in eval mode
    torch.testing.assert_close(out, _t([0.9, -0.9, 0.0, 0.9, 0.0, 0.9]), **TOL)
    assert "alpha" in q.state_dict() and "curvature" not in q.state_dict()


def test_laq_per_row():
    """Rows [0.5, -1.2, 0.1], [2.0, -0.05, 0.8], alpha [0.9, 1.0], iters 1, 2 bits, D = identity:
    row 0: b = [1, -1, 0] -> alpha = 1.7/2 = 0.85;  row 1: b = [1, 0, 1] -> alpha = 2.8/2 = 1.4
    final: row 0 w/0.85 = [0.59, -1.41, 0.12] -> [1, -1, 0]; row 1 w/1.4 = [1.43, -0.04, 0.57] -> [1, 0, 1]"""
    q = _laq(2, [0.9, 1.0], iters=1, num_rows=2)
    wq = q(_t([[0.5, -1.2, 0.1], [2.0, -0.05, 0.8]]))
    torch.testing.assert_close(q.alpha, _t([0.85, 1.4]), **TOL)
    torch.testing.assert_close(wq, _t([[0.85, -0.85, 0.0], [1.4, 0.0, 1.4]]), **TOL)


def test_laq_curvature_shape_checked():
    q = _laq(2, 0.9)
    q.set_curvature(torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="curvature of shape"):
        q(_t(W))
    with pytest.raises(ValueError, match="finite"):
        q.set_curvature(_t([1.0, -1.0]))


# ====================================================================================== TWN, min-max


def test_twn_threshold_hand_example():
    """delta = 0.7 * 0.775 = 0.5425: kept |w| > delta are -1.2, 2.0, 0.8 (0.5 is below)
    alpha = (1.2 + 2.0 + 0.8) / 3 = 4/3; codes [0, -1, 0, 1, 0, 1]; identity STE."""
    q = TWNQuantizer(2).double()
    w = _t(W, grad=True)
    wq = q(w)
    torch.testing.assert_close(wq, _t([0.0, -4 / 3, 0.0, 4 / 3, 0.0, 4 / 3]), **TOL)
    wq.backward(_t(G))
    torch.testing.assert_close(w.grad, _t(G), rtol=0, atol=0)
    codes, step = q.codes(w)
    assert codes.tolist() == [0, -1, 0, 1, 0, 1] and step.item() == pytest.approx(4 / 3, abs=1e-12)
    # a threshold of 0.6 (delta 0.465) keeps 0.5 as well: alpha = 4.5/4 = 1.125
    q6 = TWNQuantizer(2, threshold=0.6).double()
    torch.testing.assert_close(q6(_t(W)), _t([1.125, -1.125, 0.0, 1.125, 0.0, 1.125]), **TOL)
    assert q.scale_parameters() == []


def test_twn_per_row():
    """Row 0 [0.5, -1.2, 0.1]: mean 0.6, delta 0.42 -> keep 0.5, -1.2, alpha 0.85
    Row 1 [2.0, -0.05, 0.8]: mean 0.95, delta 0.665 -> keep 2.0, 0.8, alpha 1.4"""
    q = TWNQuantizer(2, num_rows=2).double()
    out = q(_t([[0.5, -1.2, 0.1], [2.0, -0.05, 0.8]]))
    torch.testing.assert_close(out, _t([[0.85, -0.85, 0.0], [1.4, 0.0, 1.4]]), **TOL)


MINMAX_HAND = {
    # alpha = 2.0; n = 1, step 2: w/2 = [0.25, -0.6, 0.05, 1, -0.025, 0.4] -> [0, -1, 0, 1, 0, 0]
    2: [0, -1, 0, 1, 0, 0],
    # n = 7, step 2/7: w*3.5 = [1.75, -4.2, 0.35, 7, -0.175, 2.8] -> [2, -4, 0, 7, 0, 3]
    4: [2, -4, 0, 7, 0, 3],
    # n = 127, step 2/127: w*63.5 = [31.75, -76.2, 6.35, 127, -3.175, 50.8] -> [32, -76, 6, 127, -3, 51]
    8: [32, -76, 6, 127, -3, 51],
}


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_minmax_hand_values(bits):
    q = MinMaxQuantizer(bits).double()
    w = _t(W, grad=True)
    wq = q(w)
    n = 2 ** (bits - 1) - 1
    torch.testing.assert_close(wq, _t(MINMAX_HAND[bits]) * (2.0 / n), **TOL)
    wq.backward(_t(G))
    torch.testing.assert_close(w.grad, _t(G), rtol=0, atol=0)
    assert q.codes(w)[0].tolist() == MINMAX_HAND[bits]


def test_minmax_per_row():
    """Row maxima 1.2 and 2.0, 2 bits: row 0 w/1.2 = [0.42, -1, 0.08] -> [0, -1, 0];
    row 1 w/2 = [1, -0.025, 0.4] -> [1, 0, 0]"""
    q = MinMaxQuantizer(2, num_rows=2).double()
    out = q(_t([[0.5, -1.2, 0.1], [2.0, -0.05, 0.8]]))
    torch.testing.assert_close(out, _t([[0.0, -1.2, 0.0], [2.0, 0.0, 0.0]]), **TOL)


# ====================================================================================== QuantGPT + PACT grad


@pytest.mark.parametrize("bits,codes", [(2, [1, -1, 0, 1, 0, 1]), (4, [4, -7, 1, 7, 0, 6])])
def test_quantgpt_pact_grad_hand_values(bits, codes):
    """Same forward as QuantGPT (gamma 1.2 -> alpha 0.93, the codes of test_quant_functional);
    dL/dalpha from the clipped -1.2 and 2.0 only: 2*(-1) + 0.5*(+1) = -1.5
    dL/dgamma = mean|w| * -1.5 = 0.775 * -1.5 = -1.1625 (QuantGPT's own: -0.8125 / -1.0339)."""
    q = PACTGradDynamicScaleQuantizer(bits).double()
    with torch.no_grad():
        q.gamma.fill_(1.2)
    w = _t(W, grad=True)
    wq = q(w)
    n = 2 ** (bits - 1) - 1
    torch.testing.assert_close(wq, _t(codes) * (0.93 / n), **TOL)
    wq.backward(_t(G))
    torch.testing.assert_close(w.grad, _t([1.0, 0.0, -1.0, 0.0, 3.0, -2.0]), rtol=0, atol=0)
    torch.testing.assert_close(q.gamma.grad, _t(-1.1625), **TOL)
    assert WEIGHT_QUANTIZERS["quantgpt_pact_grad"] is PACTGradDynamicScaleQuantizer


def test_quantgpt_pact_grad_full_grid_hand_values():
    """grid="full", gamma 0.5 -> alpha 0.3875, range [-0.775, 0.3875] (test_quant_functional's
    FULL_GRID_HAND): outside are 0.5, -1.2 (below: code -2), 2.0, 0.8 with codes 1, -2, 1, 1;
    PACT's dL/dalpha = sum_out g * code / n = 1 - 4 + 0.5 - 2 = -4.5, dL/dgamma = 0.775 * -4.5."""
    q = PACTGradDynamicScaleQuantizer(2, grid="full").double()
    with torch.no_grad():
        q.gamma.fill_(0.5)
    w = _t(W, grad=True)
    wq = q(w)
    torch.testing.assert_close(wq, _t([1, -2, 0, 1, 0, 1]) * 0.3875, **TOL)
    wq.backward(_t(G))
    torch.testing.assert_close(w.grad, _t([0.0, 0.0, -1.0, 0.0, 3.0, 0.0]), rtol=0, atol=0)
    torch.testing.assert_close(q.gamma.grad, _t(-3.4875), **TOL)


def test_quantgpt_pact_grad_mean_path():
    """detach_mean=False adds gamma * sign(w) / N * dL/dalpha = 1.2/6 * -1.5 = -0.3 per sign(w)."""
    q = PACTGradDynamicScaleQuantizer(2, detach_mean=False).double()
    with torch.no_grad():
        q.gamma.fill_(1.2)
    w = _t(W, grad=True)
    q(w).backward(_t(G))
    e = -0.3
    torch.testing.assert_close(w.grad, _t([1 + e, 0 - e, -1 + e, 0 + e, 3 - e, -2 + e]), **TOL)


# ====================================================================================== shared interface

NAMES = ["pact", "lsq", "laq", "twn", "minmax", "quantgpt_pact_grad"]
CODE_RANGE = {"lsq": lambda b: (-(2 ** (b - 1)), 2 ** (b - 1) - 1), "twn": lambda b: (-1, 1)}


def _bits_for(name):
    return [2] if name == "twn" else [2, 4, 8]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("per_row", [False, True])
def test_codes_exact_and_in_range(name, per_row):
    torch.manual_seed(len(name))
    w = torch.randn(6, 20) * 0.05
    for bits in _bits_for(name):
        q = WEIGHT_QUANTIZERS[name](bits, num_rows=6 if per_row else None)
        q.initialize(w)
        assert bool(q.initialized)
        with torch.no_grad():
            for p in q.scale_parameters():  # a smaller scale so that some weights clip
                p.mul_(0.7)
        out = q(w)
        codes, step = q.codes(w)
        assert torch.equal(codes * step, out)
        assert torch.equal(codes, torch.round(codes))
        lo, hi = CODE_RANGE.get(name, lambda b: (-(2 ** (b - 1) - 1), 2 ** (b - 1) - 1))(bits)
        assert codes.min() >= lo and codes.max() <= hi
        assert (step > 0).all()
        assert extra_ok(q)


def extra_ok(q):
    r = repr(q)
    return f"bits={q.bits}" in r and "per_row" in r


@pytest.mark.parametrize("name", NAMES)
def test_bits_validation(name):
    cls = WEIGHT_QUANTIZERS[name]
    bad = [1, 9]
    if name == "twn":
        bad = [1, 3, 4, 8]
    for b in bad:
        with pytest.raises(ValueError, match="supports bits"):
            cls(b)
    for b in cls.supported_bits:
        cls(b)


def test_twn_rejected_by_config_at_4_bits(tmp_path):
    cfg = compose_cfg(["method=twn", "bits=4"], tmp_path)
    with pytest.raises(QgplmError, match="cannot quantize"):
        RunConfig.from_hydra(cfg)


# ====================================================================================== through quantize_model


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("per_row", [False, True])
def test_quantize_model_forward_backward(name, per_row):
    model = tiny_gpt2()
    bits = 2 if name == "twn" else 4
    quantize_model(model, QuantConfig(weight_bits=bits, embedding_bits=bits, activation_bits=8,
                                      quantizer=name, per_row=per_row))
    qs = [m.weight_quantizer for _, m in quantized_modules(model)]
    assert qs and all(type(q) is WEIGHT_QUANTIZERS[name] for q in qs)
    assert initialize_quantizers(model) == 5  # wte (+ tied head), c_attn, c_proj, c_fc, mlp.c_proj
    model.train()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()
               if p.requires_grad and p.dim() >= 2)
    scales = scale_parameters(model)
    if name in ("pact", "lsq", "quantgpt_pact_grad"):
        assert len(scales) == 5
        for p in scales:
            assert p.grad is not None and torch.isfinite(p.grad).all()
        if name == "lsq":  # every element contributes to LSQ's step gradient
            assert all(bool((p.grad != 0).all()) for p in scales)
        else:
            assert any(bool((p.grad != 0).any()) for p in scales)
    else:
        assert scales == []


def test_pact_scale_gradient_nonzero_where_clipped():
    model = tiny_gpt2()
    quantize_model(model, QuantConfig(weight_bits=2, embedding_bits=2, quantizer="pact"))
    initialize_quantizers(model)  # alpha = 1.4 mean|w|: every module clips some weights at 2 bits
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    for _, m in quantized_modules(model):
        assert m.weight_quantizer.alpha.grad.item() != 0


# ====================================================================================== LAQ callback


def test_laq_callback_sets_curvature_from_adamw_state():
    model = tiny_gpt2()
    quantize_model(model, QuantConfig(weight_bits=2, embedding_bits=2, quantizer="laq"))
    initialize_quantizers(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cb = LAQCurvatureCallback(eps=1e-8)
    trainer = SimpleNamespace(optimizers=[opt])
    module = SimpleNamespace(model=model)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))

    cb.on_train_batch_start(trainer, module, None, 0)  # no optimizer state yet: D stays identity
    assert cb.updated == 0
    assert all(m.weight_quantizer.curvature is None for _, m in quantized_modules(model))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()

    cb.on_train_batch_start(trainer, module, None, 1)
    assert cb.updated == 5  # the tied embedding/head quantizer once
    conv_seen = False
    for _, m in quantized_modules(model):
        q = m.weight_quantizer
        v = opt.state[m.weight]["exp_avg_sq"]
        expect = v.sqrt() + 1e-8
        if isinstance(m, QuantConv1D):
            expect = expect.t()
            conv_seen = True
        assert q.curvature.shape == oriented_weight(m).shape
        torch.testing.assert_close(q.curvature, expect, rtol=0, atol=0)
    assert conv_seen
    # the next training forward uses D: alpha changes from the identity-D solution
    before = {id(m.weight_quantizer): m.weight_quantizer.alpha.clone() for _, m in quantized_modules(model)}
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[id(m.weight_quantizer)], m.weight_quantizer.alpha)
               for _, m in quantized_modules(model))


# ====================================================================================== configs

METHODS = ["pact", "lsq", "lsq_ternary", "laq", "twn", "minmax", "quantgpt_no_contrastive", "quantgpt_pact_grad",
           "kd_only", "quantgpt_full_grid"]


@pytest.mark.parametrize("method", METHODS)
def test_method_configs_compose_and_build(method, tmp_path):
    run = RunConfig.from_hydra(compose_cfg([f"method={method}"], tmp_path))
    m = run.method
    assert m.name == method
    cls = WEIGHT_QUANTIZERS[m.quantizer]
    q = cls(run.bits.weight, **m.quantizer_kwargs)  # only kwargs the quantizer accepts
    assert isinstance(q, cls)
    expect_contrastive = 0.1 if method in ("quantgpt_pact_grad", "quantgpt_full_grid") else 0.0
    assert m.distill.contrastive_weight == expect_contrastive
    assert run.quant.quantizer == m.quantizer
    if method == "kd_only":
        assert m.quantizer == "minmax"
    if method.startswith("lsq"):
        assert q.symmetric == (method == "lsq_ternary")
    if method.startswith("quantgpt"):
        assert m.quantizer in ("quantgpt", "quantgpt_pact_grad")
        assert q.full_grid == (method == "quantgpt_full_grid")


# ================================================================================ LAQ: one alpha per step


def _laq_tied_model():
    model = tiny_gpt2()
    quantize_model(model, QuantConfig(weight_bits=2, embedding_bits=2, quantizer="laq"))
    initialize_quantizers(model)
    return model.train()


def _record_tied_quantizations(model):
    """Every quantized table the tied quantizer returns during a forward, in call order."""
    q = model.transformer.wte.weight_quantizer
    assert q is model.lm_head.weight_quantizer
    seen = []
    handle = q.register_forward_hook(lambda mod, inp, out: seen.append((out.detach().clone(), mod.alpha.clone())))
    return seen, handle


def test_laq_tied_embedding_and_head_use_the_same_codes_in_a_training_forward():
    """GPT-2's wte and lm_head share one Parameter and one LAQ quantizer; both calls of a training
    forward must quantize with the same alpha (it was re-solved per call: two different grids),
    at the first step (D = identity) and after an optimizer step (D from Adam)."""
    model = _laq_tied_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cb = LAQCurvatureCallback()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    seen, handle = _record_tied_quantizations(model)
    for step in range(3):
        cb.on_train_batch_start(SimpleNamespace(optimizers=[opt], global_step=step), SimpleNamespace(model=model),
                                None, step)
        seen.clear()
        model(input_ids=ids, labels=ids).loss.backward()
        assert len(seen) == 2  # the table (embedding lookup) and the head
        (table, a_table), (head, a_head) = seen
        assert torch.equal(a_table, a_head), step
        assert torch.equal(table, head), step
        codes, scale = model.transformer.wte.weight_quantizer.codes(model.transformer.wte.weight)
        assert torch.equal(codes * scale, head)  # and the export's codes are those of the forward
        opt.step()
        opt.zero_grad()
    handle.remove()


def test_laq_alpha_solved_once_per_optimizer_step_under_gradient_accumulation():
    """Micro-batches of one optimizer step (weights unchanged) all use one alpha; the next step
    (weights and D changed) solves a new one, once."""
    model = _laq_tied_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cb = LAQCurvatureCallback()
    q = model.transformer.h[0].attn.c_attn.weight_quantizer
    gen = torch.Generator().manual_seed(2)
    alphas = []
    for step in range(2):
        for micro in range(3):
            cb.on_train_batch_start(SimpleNamespace(optimizers=[opt], global_step=step),
                                    SimpleNamespace(model=model), None, 3 * step + micro)
            ids = torch.randint(0, 50, (2, 8), generator=gen)
            model(input_ids=ids, labels=ids).loss.backward()
            alphas.append(q.alpha.clone())
        opt.step()
        opt.zero_grad()
    assert torch.equal(alphas[0], alphas[1]) and torch.equal(alphas[1], alphas[2])
    assert torch.equal(alphas[3], alphas[4]) and torch.equal(alphas[4], alphas[5])
    assert not torch.equal(alphas[2], alphas[3])


def test_pact_and_quantgpt_default_initial_grids_differ():
    """What quant/baselines.py's docstring says: PACT's initial alpha is QuantGPT's
    fallback 1.4 mean|w| at 2 bits, while QuantGPT's default (gamma_init=mse) gamma is about 1.53;
    only gamma_init=fixed gives QuantGPT PACT's grid."""
    def init_scales(quantizer, **kwargs):
        model = tiny_gpt2()
        quantize_model(model, QuantConfig(weight_bits=2, embedding_bits=2, quantizer=quantizer,
                                          quantizer_kwargs=kwargs))
        initialize_quantizers(model)
        out = []
        for _, m in quantized_modules(model):
            q, mean = m.weight_quantizer, oriented_weight(m).detach().abs().mean()
            out.append((q.alpha / mean).item() if quantizer == "pact" else q.gamma.item())
        return out

    assert all(s == pytest.approx(1.4, abs=1e-5) for s in init_scales("pact"))
    mse = init_scales("quantgpt")
    assert all(1.45 < g < 1.65 for g in mse), mse
    assert all(g == pytest.approx(1.4) for g in init_scales("quantgpt", gamma_init="fixed"))
