"""Numerical tests of the quantizer autograd functions and of DynamicScaleQuantizer.

Expected values are computed by hand (the derivations are in the comments) and written as
literals; where a second implementation is used it is an independent plain-torch reference
with the STE written as `x + (round(x) - x).detach()`, differentiated by autograd.
"""

from __future__ import annotations

import pytest
import torch

from qgplm.quant import DynamicScaleQuantizer
from qgplm.quant.functional import (
    dynamic_scale_codes,
    dynamic_scale_quantize,
    levels,
    minmax_activation_quantize,
)

F64 = torch.float64

# --------------------------------------------------------------------------------------------
# Shared hand example:
#   w = [0.5, -1.2, 0.1, 2.0, -0.05, 0.8]     sum|w| = 4.65, mean|w| = 0.775
#   gamma = 1.2  ->  alpha = 1.2 * 0.775 = 0.93
#   clipped (|w| > 0.93): -1.2 and 2.0 (indices 1, 3); inside: 0.5, 0.1, -0.05, 0.8
#   u = w / 0.93 inside = [0.537634, 0.107527, -0.053763, 0.860215]
#   upstream gradient g = [1, 2, -1, 0.5, 3, -2]
#   dL/dw = g where inside, 0 where clipped = [1, 0, -1, 0, 3, -2]
#   dL/dalpha = sum_inside g*(codes/n - u) + sum_clipped g*sign(w)
#             = (g.codes)_inside / n - (g.w)_inside / alpha + (2*(-1) + 0.5*(+1))
#     (g.w)_inside = 0.5 - 0.1 - 0.15 - 1.6 = -1.35  ->  -(g.w)/alpha = 1.35/0.93
#   dL/dgamma = mean|w| * dL/dalpha = 0.775 * ((g.codes)_in/n - 1.5) + 1.35/1.2
#             = 0.775 * ((g.codes)_in/n - 1.5) + 1.125
# --------------------------------------------------------------------------------------------
W = [0.5, -1.2, 0.1, 2.0, -0.05, 0.8]
G = [1.0, 2.0, -1.0, 0.5, 3.0, -2.0]
GAMMA = 1.2

HAND = {
    # 2 bits, n = 1: u*n = [0.5376, -1(clip), 0.1075, 1(clip), -0.0538, 0.8602]
    #   codes = [1, -1, 0, 1, 0, 1]; w_q = codes * 0.93
    #   (g.codes)_in = 1*1 + (-1)*0 + 3*0 + (-2)*1 = -1
    #   dL/dgamma = 0.775 * (-1 - 1.5) + 1.125 = -1.9375 + 1.125 = -0.8125
    2: dict(
        codes=[1, -1, 0, 1, 0, 1],
        wq=[0.93, -0.93, 0.0, 0.93, 0.0, 0.93],
        dalpha=[1 - 0.5 / 0.93, -1.0, -0.1 / 0.93, 1.0, 0.05 / 0.93, 1 - 0.8 / 0.93],
        dgamma=-0.8125,
    ),
    # 4 bits, n = 7: u*7 = [3.763, -7, 0.753, 7, -0.376, 6.022] -> codes [4, -7, 1, 7, 0, 6]
    #   step = 0.93/7 = 0.132857142857
    #   (g.codes)_in = 4 - 1 + 0 - 12 = -9
    #   dL/dgamma = 0.775 * (-9/7 - 1.5) + 1.125 = -2.158928571 + 1.125 = -1.033928571
    4: dict(
        codes=[4, -7, 1, 7, 0, 6],
        wq=[0.531428571428571, -0.93, 0.132857142857143, 0.93, 0.0, 0.797142857142857],
        dalpha=[4 / 7 - 0.5 / 0.93, -1.0, 1 / 7 - 0.1 / 0.93, 1.0, 0.05 / 0.93, 6 / 7 - 0.8 / 0.93],
        dgamma=-1.033928571428571,
    ),
    # 8 bits, n = 127: u*127 = [68.28, -127, 13.66, 127, -6.83, 109.25]
    #   codes = [68, -127, 14, 127, -7, 109]; step = 0.93/127 = 0.007322834646
    #   (g.codes)_in = 68 - 14 - 21 - 218 = -185
    #   dL/dgamma = 0.775 * (-185/127 - 1.5) + 1.125 = -2.291437008 + 1.125 = -1.166437008
    8: dict(
        codes=[68, -127, 14, 127, -7, 109],
        wq=[0.497952755905512, -0.93, 0.102519685039370, 0.93, -0.051259842519685, 0.798188976377953],
        dalpha=[68 / 127 - 0.5 / 0.93, -1.0, 14 / 127 - 0.1 / 0.93, 1.0, -7 / 127 + 0.05 / 0.93,
                109 / 127 - 0.8 / 0.93],
        dgamma=-1.166437007874016,
    ),
}


def _t(values, dtype=F64, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def reference_quantize(w, gamma, bits, per_row=False, detach_mean=True, full_grid=False):
    """Independent plain-torch QuantGPT quantizer; autograd + an explicit STE give the backward."""
    n = 2 ** (bits - 1) - 1
    wa = w.detach() if detach_mean else w
    m = wa.abs().mean(dim=-1, keepdim=True) if per_row else wa.abs().mean()
    alpha = (gamma.view(-1, 1) if per_row else gamma) * m
    lower = -alpha * (2 ** (bits - 1)) / n if full_grid else -alpha
    u = torch.maximum(torch.minimum(w, alpha), lower) / alpha
    x = u * n
    x = x + (torch.round(x) - x).detach()  # straight-through round
    return alpha * x / n


# ----------------------------------------------------------------------------- dynamic scaling


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_dynamic_scale_forward_backward_hand_values(bits, dtype):
    hand = HAND[bits]
    w = _t(W, dtype, grad=True)
    gamma = torch.tensor(GAMMA, dtype=dtype, requires_grad=True)
    wq = dynamic_scale_quantize(w, gamma, bits)
    tol = dict(rtol=0, atol=1e-12) if dtype == F64 else dict(rtol=0, atol=2e-6)

    torch.testing.assert_close(wq, _t(hand["wq"], dtype), **tol)
    wq.backward(_t(G, dtype))
    # dL/dw = g inside, 0 on the clipped -1.2 and 2.0
    torch.testing.assert_close(w.grad, _t([1.0, 0.0, -1.0, 0.0, 3.0, -2.0], dtype), rtol=0, atol=0)
    torch.testing.assert_close(gamma.grad, torch.tensor(hand["dgamma"], dtype=dtype), **tol)
    # cross-check: dL/dgamma == mean|w| * sum(g * dwq/dalpha) with the listed dwq/dalpha
    expect = 0.775 * sum(gi * di for gi, di in zip(G, hand["dalpha"], strict=True))
    assert gamma.grad.item() == pytest.approx(expect, abs=1e-5)


def test_dynamic_scale_gamma_grad_uses_clipped_sign_not_zero():
    """Only clipped elements, g = 1: dL/dalpha = sum sign(w) = (+1 -1 +1) = 1, dL/dgamma = mean|w|."""
    w = _t([3.0, -2.0, 1.0])  # mean|w| = 2; gamma = 0.25 -> alpha = 0.5, everything clipped
    gamma = _t(0.25, grad=True)
    wq = dynamic_scale_quantize(w, gamma, 2)
    torch.testing.assert_close(wq, _t([0.5, -0.5, 0.5]), rtol=0, atol=1e-15)
    wq.backward(torch.ones(3, dtype=F64))
    assert gamma.grad.item() == pytest.approx(2.0, abs=1e-12)


def test_dynamic_scale_is_ternary_at_2_bits():
    torch.manual_seed(0)
    w = torch.randn(40, 30)
    gamma = torch.tensor(1.4)
    wq = dynamic_scale_quantize(w, gamma, 2)
    alpha = 1.4 * w.abs().mean()
    vals = torch.unique(wq / alpha)
    assert len(vals) == 3
    torch.testing.assert_close(vals, torch.tensor([-1.0, 0.0, 1.0]))


# Per-row hand example:
#   w = [[0.5, -1.2, 0.1], [2.0, -0.05, 0.8]]  row means 0.6, 0.95
#   gamma = [1.5, 1.0] -> alpha = [0.9, 0.95]; clipped: -1.2 (row 0), 2.0 (row 1)
#   g = [[1, 2, -1], [0.5, 3, -2]]
PR_W = [[0.5, -1.2, 0.1], [2.0, -0.05, 0.8]]
PR_G = [[1.0, 2.0, -1.0], [0.5, 3.0, -2.0]]
PR_HAND = {
    # 2 bits: row0 u = [0.556, -1, 0.111] -> codes [1, -1, 0]; row1 u = [1, -0.053, 0.842] -> [1, 0, 1]
    #   row0 dL/dalpha = 1*(1-5/9) + 2*(-1) - 1*(0-1/9) = -13/9;  dgamma0 = 0.6 * -13/9 = -0.866667
    #   row1 dL/dalpha = 0.5*1 + 3*(0+0.05/0.95) - 2*(1-0.8/0.95) = 13/38; dgamma1 = 0.95*13/38 = 0.325
    2: dict(wq=[[0.9, -0.9, 0.0], [0.95, 0.0, 0.95]], dgamma=[-13 / 15, 0.325]),
    # 4 bits: row0 u*7 = [3.889, -7, 0.778] -> [4, -7, 1]; row1 u*7 = [7, -0.368, 5.895] -> [7, 0, 6]
    #   dgamma0 = 0.6 * (3/7 - 4/9 - 2) = 0.6 * (-127/63) = -1.209523810
    #   dgamma1 = 0.95*0.5 + 3*0.05 - 2*(0.95*6/7 - 0.8) = 0.625 - 0.0285714 = 0.596428571
    4: dict(wq=[[4 * 0.9 / 7, -0.9, 0.9 / 7], [0.95, 0.0, 6 * 0.95 / 7]],
            dgamma=[-1.209523809523810, 0.596428571428571]),
}


@pytest.mark.parametrize("bits", [2, 4])
def test_dynamic_scale_per_row_hand_values(bits):
    w = _t(PR_W, grad=True)
    gamma = _t([1.5, 1.0], grad=True)
    wq = dynamic_scale_quantize(w, gamma, bits, per_row=True)
    torch.testing.assert_close(wq, _t(PR_HAND[bits]["wq"]), rtol=0, atol=1e-12)
    wq.backward(_t(PR_G))
    torch.testing.assert_close(w.grad, _t([[1.0, 0.0, -1.0], [0.0, 3.0, -2.0]]), rtol=0, atol=0)
    assert gamma.grad.shape == (2,)
    torch.testing.assert_close(gamma.grad, _t(PR_HAND[bits]["dgamma"]), rtol=0, atol=1e-12)


def test_detach_mean_false_hand_values():
    """Extra path: dL/dw_j += gamma * sign(w_j) / N * dL/dalpha.

    2 bits: dL/dalpha = -0.8125 / 0.775 = -1.048387097; gamma/N = 1.2/6 = 0.2
      extra = -0.209677419 * sign(w) -> [-0.2097, +0.2097, -0.2097, -0.2097, +0.2097, -0.2097]
    dL/dgamma is unchanged (the mean path only adds to w's gradient).
    """
    w = _t(W, grad=True)
    gamma = _t(GAMMA, grad=True)
    dynamic_scale_quantize(w, gamma, 2, detach_mean=False).backward(_t(G))
    e = 0.8125 / 0.775 * 0.2  # 0.2096774193548387
    expect = [1 - e, 0 + e, -1 - e, 0 - e, 3 + e, -2 - e]
    torch.testing.assert_close(w.grad, _t(expect), rtol=0, atol=1e-12)
    assert gamma.grad.item() == pytest.approx(-0.8125, abs=1e-12)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("detach_mean", [True, False])
@pytest.mark.parametrize("full_grid", [False, True])
def test_dynamic_scale_matches_autograd_reference(bits, per_row, detach_mean, full_grid):
    torch.manual_seed(bits * 10 + per_row * 2 + detach_mean)
    w = torch.randn(5, 16, dtype=F64)
    gamma0 = torch.rand(5, dtype=F64) + 0.8 if per_row else torch.tensor(1.3, dtype=F64)
    if full_grid:  # narrower range so that the lower bound -alpha 2^(b-1)/n clips too
        gamma0 = gamma0 * 0.6
    g = torch.randn(5, 16, dtype=F64)

    w1, gam1 = w.clone().requires_grad_(), gamma0.clone().requires_grad_()
    out1 = dynamic_scale_quantize(w1, gam1, bits, per_row, detach_mean, full_grid)
    out1.backward(g)
    w2, gam2 = w.clone().requires_grad_(), gamma0.clone().requires_grad_()
    out2 = reference_quantize(w2, gam2, bits, per_row, detach_mean, full_grid)
    out2.backward(g)

    alpha = (gamma0.view(-1, 1) if per_row else gamma0) * (
        w.abs().mean(-1, keepdim=True) if per_row else w.abs().mean()
    )
    lower = -alpha * (2 ** (bits - 1)) / levels(bits) if full_grid else -alpha
    clipped = (w > alpha) | (w < lower)
    assert clipped.any() and (~clipped).any()  # the example exercises both branches
    assert (w < lower).any()  # and the lower bound
    torch.testing.assert_close(out1, out2, rtol=0, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(gam1.grad, gam2.grad, rtol=0, atol=1e-12)


def test_gradcheck_gamma_when_everything_clipped():
    """All |w| > alpha: w_q = sign(w) * gamma * mean|w| is smooth (linear) in gamma."""
    w = _t([0.5, -1.2, 0.9, 2.0, -0.7, 0.8]).reshape(2, 3)  # mean 1.0167 -> alpha 0.305 at 0.3
    gamma = _t(0.3, grad=True)
    for bits in (2, 4, 8):
        assert torch.autograd.gradcheck(lambda gm, bits=bits: dynamic_scale_quantize(w, gm, bits), (gamma,))
    # per-row: row means 0.8667 / 1.1667, gammas 0.3 / 0.5 -> alphas 0.26 / 0.583
    gam_r = _t([0.3, 0.5], grad=True)
    assert torch.autograd.gradcheck(
        lambda gm: dynamic_scale_quantize(w, gm, 4, per_row=True), (gam_r,)
    )


def test_gradcheck_w_and_gamma_all_clipped_with_mean_path():
    """With detach_mean=False and everything clipped, the full (w, gamma) Jacobian is the true one."""
    w = _t([0.5, -1.2, 0.9, 2.0, -0.7, 0.8], grad=True)
    gamma = _t(0.3, grad=True)
    assert torch.autograd.gradcheck(
        lambda ww, gm: dynamic_scale_quantize(ww, gm, 2, detach_mean=False), (w, gamma)
    )


def test_gradcheck_ste_surrogate_for_in_range_elements():
    """Inside the clip range the STE treats round(x) as x + const: gradcheck a surrogate in which the
    rounding offset is a frozen constant and compare the analytic Jacobians with the quantizer's."""
    bits, n = 4, 7
    w0 = _t([0.31, -0.42, 0.13, 0.77, -0.05, 0.6])  # mean|w| = 2.28 / 6 = 0.38
    gamma0 = _t(3.0)  # alpha = 1.14 > max|w| = 0.77: every element inside the clip range

    def surrogate(ww, gm):
        alpha = gm * w0.abs().mean()  # detach_mean=True: mean treated as a constant
        x = ww / alpha * n
        off = (torch.round(w0 / (gamma0 * w0.abs().mean()) * n) - w0 / (gamma0 * w0.abs().mean()) * n)
        return alpha * (x + off) / n

    w, gamma = w0.clone().requires_grad_(), gamma0.clone().requires_grad_()
    assert torch.autograd.gradcheck(surrogate, (w, gamma))
    jac_ref = torch.autograd.functional.jacobian(surrogate, (w0, gamma0))
    jac_q = torch.autograd.functional.jacobian(lambda ww, gm: dynamic_scale_quantize(ww, gm, bits), (w0, gamma0))
    torch.testing.assert_close(jac_q[0], jac_ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(jac_q[1], jac_ref[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(jac_q[0], torch.eye(6, dtype=F64), rtol=0, atol=0)  # identity STE


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_row", [False, True])
def test_dynamic_scale_codes_are_integers_and_exact(bits, per_row):
    torch.manual_seed(bits)
    w = torch.randn(6, 20)
    gamma = torch.rand(6) + 0.7 if per_row else torch.tensor(1.1)
    codes, step = dynamic_scale_codes(w, gamma, bits, per_row)
    n = levels(bits)
    assert torch.equal(codes, torch.round(codes))
    assert codes.min() >= -n and codes.max() <= n
    assert codes.abs().max() == n  # gamma small enough that some weights clip to the extreme code
    assert torch.equal(codes * step, dynamic_scale_quantize(w, gamma, bits, per_row))


def test_dynamic_scale_codes_hand_values():
    w = _t(W)
    for bits in (2, 4, 8):
        codes, step = dynamic_scale_codes(w, _t(GAMMA), bits)
        assert codes.tolist() == HAND[bits]["codes"]
        assert step.item() == pytest.approx(0.93 / levels(bits), abs=1e-15)


# Full grid (grid="full": codes in [-(n+1), n]), 2 bits, n = 1, on the shared W (mean|w| = 0.775):
#   gamma = 0.8 -> alpha = 0.62, range [-1.24, 0.62]; clipped: 2.0 and 0.8 (above), none below
#     u = [0.806452, -1.935484, 0.161290, 1(clip), -0.080645, 1(clip)] -> codes [1, -2, 0, 1, 0, 1]
#     -1.2 is inside and gets the fourth level -2 (on the ternary grid it clips to -1)
#     dL/dalpha = (g.codes)_in - (g.w)_in/alpha + sum_out g*codes/n
#               = (1 - 4) + 2.15/0.62 + (0.5 - 2) ;  dL/dgamma = 0.775 * that
#               = -3.4875 + 2.15 * 1.25 = -0.8        (0.775 / 0.62 = 1.25)
#   gamma = 0.5 -> alpha = 0.3875, range [-0.775, 0.3875]; inside: 0.1, -0.05 only
#     codes [1, -2, 0, 1, 0, 1]; -1.2 is clipped below: dw_q/dalpha = -2 there
#     dL/dalpha = (0 - 0) + 0.25/0.3875 + (1 - 4 + 0.5 - 2) ; dL/dgamma = 0.5 - 3.4875 = -2.9875
FULL_GRID_HAND = {
    0.8: dict(codes=[1, -2, 0, 1, 0, 1], alpha=0.62, dw=[1.0, 2.0, -1.0, 0.0, 3.0, 0.0], dgamma=-0.8),
    0.5: dict(codes=[1, -2, 0, 1, 0, 1], alpha=0.3875, dw=[0.0, 0.0, -1.0, 0.0, 3.0, 0.0], dgamma=-2.9875),
}


@pytest.mark.parametrize("gamma", sorted(FULL_GRID_HAND))
def test_dynamic_scale_full_grid_hand_values(gamma):
    hand = FULL_GRID_HAND[gamma]
    w, gam = _t(W, grad=True), _t(gamma, grad=True)
    wq = dynamic_scale_quantize(w, gam, 2, full_grid=True)
    torch.testing.assert_close(wq, _t(hand["codes"]) * hand["alpha"], rtol=0, atol=1e-12)
    wq.backward(_t(G))
    torch.testing.assert_close(w.grad, _t(hand["dw"]), rtol=0, atol=0)
    assert gam.grad.item() == pytest.approx(hand["dgamma"], abs=1e-12)
    codes, step = dynamic_scale_codes(_t(W), _t(gamma), 2, full_grid=True)
    assert codes.tolist() == hand["codes"] and step.item() == pytest.approx(hand["alpha"], abs=1e-15)
    # the paper's symmetric grid clips -1.2 to -1 at the same gamma
    assert dynamic_scale_codes(_t(W), _t(gamma), 2)[0].tolist() == [1, -1, 0, 1, 0, 1]


def test_dynamic_scale_full_grid_uses_every_code():
    torch.manual_seed(0)
    w = torch.randn(40, 30)
    for bits in (2, 3, 4):
        codes, _ = dynamic_scale_codes(w, torch.tensor(1.0), bits, full_grid=True)
        assert torch.unique(codes).tolist() == list(range(-(2 ** (bits - 1)), 2 ** (bits - 1)))


def test_full_grid_quantizer_mse_init_beats_symmetric():
    """Same storage, one more level: the MSE-initialised 2-bit full-grid quantizer reconstructs
    Gaussian weights better than the ternary one."""
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    err = {}
    for grid in ("symmetric", "full"):
        q = DynamicScaleQuantizer(2, grid=grid)
        q.initialize(w)
        err[grid] = (q(w) - w).pow(2).sum().item()
    assert err["full"] < 0.9 * err["symmetric"]


def test_invalid_grid_rejected():
    with pytest.raises(ValueError, match="grid must be"):
        DynamicScaleQuantizer(2, grid="asym")


def test_levels():
    assert [levels(b) for b in (2, 3, 4, 8)] == [1, 3, 7, 127]


# --------------------------------------------------------------------------- min-max activations

# x = [-0.9, 0.25, 0.62, 1.43, 2.0]; range [-0.9, 2.0], width 2.9, max|x| = 2.0
X = [-0.9, 0.25, 0.62, 1.43, 2.0]
ASYM_HAND = {
    # 2 bits: qmax 3, step 2.9/3 = 0.966667, zero = round(0.931) = 1
    #   x/step = [-0.931, 0.259, 0.641, 1.479, 2.069] -> [-1, 0, 1, 1, 2]
    2: [-0.966666667, 0.0, 0.966666667, 0.966666667, 1.933333333],
    # 4 bits: qmax 15, step 2.9/15 = 0.193333, zero = round(4.655) = 5
    #   x/step = [-4.655, 1.293, 3.207, 7.397, 10.345] -> [-5, 1, 3, 7, 10]
    4: [-0.966666667, 0.193333333, 0.58, 1.353333333, 1.933333333],
    # 8 bits: qmax 255, step 2.9/255 = 0.0113725490, zero = round(79.138) = 79
    #   x/step = [-79.14, 21.98, 54.52, 125.74, 175.86] -> [-79, 22, 55, 126, 176]
    #   (max maps to code 176 + 79 = 255 and comes out at 2.001569 > max: still within step/2)
    8: [-0.898431373, 0.250196078, 0.625490196, 1.432941176, 2.001568627],
}
SYM_HAND = {
    # 2 bits: n 1, step 2.0; x/step = [-0.45, 0.125, 0.31, 0.715, 1] -> [0, 0, 0, 1, 1]
    2: [0.0, 0.0, 0.0, 2.0, 2.0],
    # 4 bits: n 7, step 2/7; x/step = [-3.15, 0.875, 2.17, 5.005, 7] -> [-3, 1, 2, 5, 7]
    4: [-0.857142857, 0.285714286, 0.571428571, 1.428571429, 2.0],
    # 8 bits: n 127, step 2/127; x/step = [-57.15, 15.875, 39.37, 90.805, 127] -> [-57, 16, 39, 91, 127]
    8: [-0.897637795, 0.251968504, 0.614173228, 1.433070866, 2.0],
}


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_minmax_asymmetric_hand_values(bits):
    out = minmax_activation_quantize(torch.tensor(X), bits)
    torch.testing.assert_close(out, torch.tensor(ASYM_HAND[bits]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_minmax_symmetric_hand_values(bits):
    out = minmax_activation_quantize(torch.tensor(X), bits, symmetric=True)
    torch.testing.assert_close(out, torch.tensor(SYM_HAND[bits]), rtol=0, atol=1e-6)


def test_minmax_zero_point_keeps_zero_exact():
    # 2 bits on [-0.3, 1.0]: step 1.3/3 = 0.433333, zero = round(0.692) = 1
    #   x/step = [-0.692, 0, 0.231, 1.154, 2.308] -> [-1, 0, 0, 1, 2]
    x = torch.tensor([-0.3, 0.0, 0.1, 0.5, 1.0])
    out = minmax_activation_quantize(x, 2)
    torch.testing.assert_close(out, torch.tensor([-0.433333333, 0.0, 0.0, 0.433333333, 0.866666667]),
                               rtol=0, atol=1e-6)
    assert out[1].item() == 0.0 and out[2].item() == 0.0


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_minmax_error_bound_and_level_count(bits, symmetric):
    torch.manual_seed(bits + 100 * symmetric)
    x = torch.randn(4, 50) * 3 + 0.7
    out = minmax_activation_quantize(x, bits, symmetric)
    if symmetric:
        step = x.abs().max() / levels(bits)
        max_levels = 2 * levels(bits) + 1
    else:
        step = (x.max() - x.min()) / (2**bits - 1)
        max_levels = 2**bits
    err = (x - out).abs().max()
    assert err <= step / 2 * (1 + 1e-5) + 1e-6
    assert len(torch.unique(out)) <= max_levels
    # values lie on the step grid (offset by a multiple of step)
    k = out / step
    assert (k - torch.round(k)).abs().max() < 1e-3


@pytest.mark.parametrize("symmetric", [False, True])
def test_minmax_gradient_is_identity(symmetric):
    torch.manual_seed(3)
    x = torch.randn(3, 7, requires_grad=True)
    g = torch.randn(3, 7)
    minmax_activation_quantize(x, 4, symmetric).backward(g)
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("value", [0.0, 3.0, -1.5])
def test_minmax_constant_input_is_finite(symmetric, value):
    x = torch.full((2, 5), value, requires_grad=True)
    out = minmax_activation_quantize(x, 8, symmetric)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x.detach(), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


# ------------------------------------------------------------------------- DynamicScaleQuantizer


def _err(w, gamma, bits, per_row=False):
    d = (w - dynamic_scale_quantize(w, gamma, bits, per_row)).pow(2)
    return d.sum(-1) if per_row else d.sum()


def _grid_errors(w, grid, bits):
    """||w - Q_gamma(w)||^2 for every gamma of `grid` at once: one row per gamma (per-row mode
    over copies of the flattened tensor, so each row's mean|w| is the tensor's mean|w|)."""
    rows = w.reshape(1, -1).expand(len(grid), -1)
    return _err(rows, grid.to(w.dtype), bits, per_row=True)


@pytest.mark.parametrize("bits,fixed", [(2, 1.4), (4, 3.0)])
def test_mse_init_beats_fixed_and_matches_dense_grid(bits, fixed):
    torch.manual_seed(bits)
    w = torch.randn(64, 48) * 0.02
    q = DynamicScaleQuantizer(bits)  # gamma_init="mse" by default
    assert q.gamma.item() == pytest.approx(fixed)  # before init: the fixed fallback
    q.initialize(w)
    err_mse = _err(w, q.gamma.detach(), bits).item()
    err_fixed = _err(w, torch.tensor(fixed), bits).item()
    assert err_mse < err_fixed

    top = (w.abs().max() / w.abs().mean()).item()
    grid = torch.linspace(0.05, top, 4000)
    errs = _grid_errors(w, grid, bits)
    best = errs.min().item()
    assert err_mse <= best * 1.002
    assert q.gamma.item() == pytest.approx(grid[errs.argmin()].item(), abs=0.05)


def test_mse_init_per_row_beats_fixed_per_row():
    torch.manual_seed(7)
    w = torch.randn(6, 200) * torch.tensor([0.01, 0.1, 1.0, 0.05, 2.0, 0.3]).view(-1, 1)
    q = DynamicScaleQuantizer(2, num_rows=6)
    q.initialize(w)
    assert q.gamma.shape == (6,)
    err_mse = _err(w, q.gamma.detach(), 2, per_row=True)
    err_fixed = _err(w, torch.full((6,), 1.4), 2, per_row=True)
    assert (err_mse <= err_fixed).all()
    # each row's gamma is close to that row's dense-grid optimum
    grid = torch.linspace(0.05, 4.0, 1500)
    errs = torch.stack([_grid_errors(row, grid, 2) for row in w])  # [6, 1500]
    assert (err_mse <= errs.min(dim=-1).values * 1.002).all()


def test_fixed_init_uses_paper_fallbacks():
    torch.manual_seed(0)
    w = torch.randn(32, 32)
    for bits, val in ((2, 1.4), (4, 3.0)):
        q = DynamicScaleQuantizer(bits, gamma_init="fixed")
        q.initialize(w)
        assert q.gamma.item() == pytest.approx(val)
        assert bool(q.initialized)


@pytest.mark.parametrize("gamma_init", ["mse", "fixed"])
def test_8bit_init_is_max_over_mean_no_clipping(gamma_init):
    torch.manual_seed(1)
    w = torch.randn(16, 24)
    q = DynamicScaleQuantizer(8, gamma_init=gamma_init)
    q.initialize(w)
    expect = (w.abs().max() / w.abs().mean()).item()
    assert q.gamma.item() == pytest.approx(expect, rel=1e-6)
    # no clipping: alpha = gamma * mean|w| equals max|w| (up to float32 rounding of the
    # division/multiplication), so w_q's extremes are +-max|w| and every element away from the max
    # passes the gradient straight through.
    alpha = q.gamma.detach() * w.abs().mean()
    assert alpha.item() == pytest.approx(w.abs().max().item(), rel=1e-6)
    wr = w.clone().requires_grad_()
    out = q(wr)
    assert out.abs().max().item() == pytest.approx(w.abs().max().item(), rel=1e-6)
    out.backward(torch.ones_like(w))
    below_max = w.abs() < w.abs().max() * (1 - 1e-6)
    assert torch.equal(wr.grad[below_max], torch.ones_like(w)[below_max])
    assert (w - out).abs().max() <= w.abs().max() / 127 / 2 * (1 + 1e-5)


def test_8bit_per_row_init():
    torch.manual_seed(2)
    w = torch.randn(4, 10)
    q = DynamicScaleQuantizer(8, num_rows=4)
    q.initialize(w)
    torch.testing.assert_close(q.gamma.detach(), w.abs().amax(-1) / w.abs().mean(-1))


def test_initialized_buffer_and_state_dict_roundtrip():
    torch.manual_seed(0)
    w = torch.randn(8, 8)
    q = DynamicScaleQuantizer(2)
    assert not bool(q.initialized)
    sd0 = q.state_dict()
    assert set(sd0) == {"gamma", "initialized"}
    q.initialize(w)
    assert bool(q.initialized)
    sd = q.state_dict()
    assert bool(sd["initialized"]) and sd["gamma"].item() == q.gamma.item()
    q2 = DynamicScaleQuantizer(2)
    q2.load_state_dict(sd)
    assert bool(q2.initialized)
    assert q2.gamma.item() == q.gamma.item()
    assert torch.equal(q2(w), q(w))


def test_clamp_negative_gamma():
    q = DynamicScaleQuantizer(2, min_gamma=1e-3)
    with torch.no_grad():
        q.gamma.fill_(-0.5)
    assert q.clamp_() is True
    assert q.gamma.item() == pytest.approx(1e-3)
    assert q.clamp_() is False  # already valid
    assert q.gamma.item() == pytest.approx(1e-3)

    qr = DynamicScaleQuantizer(2, num_rows=3, min_gamma=0.01)
    with torch.no_grad():
        qr.gamma.copy_(torch.tensor([1.0, -2.0, 0.0]))
    assert qr.clamp_() is True
    torch.testing.assert_close(qr.gamma.detach(), torch.tensor([1.0, 0.01, 0.01]))


def test_quantizer_module_gradient_reaches_gamma_and_disable():
    torch.manual_seed(0)
    w = torch.randn(10, 10, requires_grad=True)
    q = DynamicScaleQuantizer(4)
    q(w).pow(2).sum().backward()
    assert q.gamma.grad is not None and q.gamma.grad.abs().item() > 0
    q.enabled = False
    assert q(w) is w
    q.enabled = True
    q.mix = 0.5  # ramp-in: w + 0.5 * (Q(w) - w)
    torch.testing.assert_close(q(w), w + 0.5 * (dynamic_scale_quantize(w, q.gamma, 4) - w))


def test_invalid_gamma_init_rejected():
    with pytest.raises(ValueError):
        DynamicScaleQuantizer(2, gamma_init="bogus")


def test_clamp_scales_fuses_every_quantizer_without_a_host_sync():
    """clamp_scales_: one flag tensor for all quantizers (a scale below its bound anywhere), every
    scale clamped to its own kind's bound; None when no quantizer has a bound."""
    from qgplm.quant.baselines import LSQQuantizer
    from qgplm.quant.quantizers import WeightQuantizer, clamp_scales_

    a, b = DynamicScaleQuantizer(2), DynamicScaleQuantizer(2, num_rows=3)
    lsq = LSQQuantizer(2)
    with torch.no_grad():
        a.gamma.fill_(0.5)
        b.gamma.copy_(torch.tensor([-1.0, 2.0, 0.0]))
        lsq.step.fill_(-3.0)
    flag = clamp_scales_([a, b, lsq])
    assert isinstance(flag, torch.Tensor) and bool(flag)
    assert a.gamma.item() == 0.5 and b.gamma.tolist() == pytest.approx([1e-3, 2.0, 1e-3])
    assert lsq.step.item() == pytest.approx(lsq.min_step)
    assert not bool(clamp_scales_([a, b, lsq]))  # all valid now
    assert clamp_scales_([WeightQuantizer(2)]) is None


def test_scale_warmup_sets_the_ramp_factor_only_when_it_changes():
    """ScaleWarmupCallback: mix = (step + 1) / ramp_steps during the ramp, then 1; the walk over the
    model's modules runs only at steps where the factor changes (no host work at every step after)."""
    import types

    from torch import nn

    from qgplm.train.callbacks.scale_warmup import ScaleWarmupCallback

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.walks = DynamicScaleQuantizer(2), 0

        def modules(self):
            self.walks += 1
            return super().modules()

    model = Counting()
    module = types.SimpleNamespace(model=model)
    cb = ScaleWarmupCallback(ramp_steps=2)
    cb.on_train_start(None, module)
    seen = []
    for step in range(5):
        cb.on_train_batch_start(types.SimpleNamespace(global_step=step), module, None, step)
        seen.append(model.q.mix)
    assert seen == [0.5, 1.0, 1.0, 1.0, 1.0] and model.walks == 2
    model.q.mix = 0.25  # a new fit starts over
    cb.on_train_start(None, module)
    cb.on_train_batch_start(types.SimpleNamespace(global_step=7), module, None, 0)
    assert model.q.mix == 1.0 and model.walks == 3


def test_mean_abs_is_as_accurate_as_abs_mean_on_a_large_table():
    """mean|w| by row norms (one read, no |w| temporary) is within a few fp32 ulps of the float64
    value on a large table, where one fp32 norm over the whole tensor is about 1% off; per row it is
    each row's mean|w| to fp32 accuracy."""
    from qgplm.quant.functional import _mean_abs

    w = torch.randn(8192, 576, generator=torch.Generator().manual_seed(0)) * 0.05
    exact = w.double().abs().mean()
    assert abs(float(_mean_abs(w, False)) / float(exact) - 1) < 1e-6
    rows = w.double().abs().mean(dim=-1, keepdim=True)  # fp32 sums over 576: ~1e-6 relative, as expected
    torch.testing.assert_close(_mean_abs(w, True).double(), rows, rtol=5e-6, atol=0)
    assert _mean_abs(w, True).shape == (8192, 1) and _mean_abs(w, False).dim() == 0
    v = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_mean_abs(v, False), v.abs().mean(), rtol=1e-6, atol=0)
