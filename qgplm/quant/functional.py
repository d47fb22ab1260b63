"""Autograd functions of the quantizers, with the exact backward passes of docs/method.md.

They are plain functions so that the numerical tests can check forward and backward against
hand-computed values without building any module.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-8


def levels(bits: int) -> int:
    """Levels per side of a symmetric b-bit quantizer: n = 2^(b-1) - 1 (b=2 gives ternary)."""
    return 2 ** (bits - 1) - 1


def _mean_abs(w: Tensor, per_row: bool) -> Tensor:
    """mean|w| (per row: over the last dim, kept), from row-wise L1 norms: one read of w and no |w|
    temporary, where w.abs().mean() writes a full-size one and reads it back (on a 135M-parameter
    model, every weight at every step). The whole-tensor mean sums the row norms: each an fp32 sum over
    one row, then a sum over the rows: within a few fp32 ulps of the float64 value, where a single
    norm over all of a large tensor is not (1.3% off on that table)."""
    if per_row:
        return torch.linalg.vector_norm(w, 1, dim=-1, keepdim=True) / w.shape[-1]
    rows = w.reshape(-1, w.shape[-1]) if w.dim() > 1 else w.reshape(1, -1)
    return torch.linalg.vector_norm(rows, 1, dim=-1).sum() / w.numel()


def negative_levels(bits: int, full_grid: bool) -> int:
    """Levels below zero: n on QuantGPT's symmetric grid, n + 1 = 2^(b-1) on the full two's-complement
    grid (b=2: codes {-2, -1, 0, 1}, the grid LSQ uses)."""
    n = levels(bits)
    return n + 1 if full_grid else n


def _dynamic_codes(w: Tensor, gamma: Tensor, bits: int, per_row: bool, full_grid: bool):
    """(mean|w|, alpha, codes) of the dynamic-scale forward; the one rounding rule of training and of
    the export's codes(): codes = round(clip(w, -alpha neg/n, alpha) / alpha * n).

    Written as one clamp and in-place passes over a single temporary, in the same arithmetic order
    as the formula (divide by alpha, then multiply by n), so that the codes are bit for bit those of
    the formula: on a 135M-parameter model this runs over every weight at every step. At 2 bits
    n = 1, and the multiplication, exact then, is skipped: one full pass fewer."""
    n, neg = levels(bits), negative_levels(bits, full_grid)
    m = _mean_abs(w, per_row)
    g = gamma.view(-1, 1) if per_row else gamma.reshape(())
    alpha = (g * m).clamp_min(EPS)
    codes = torch.clamp(w, -alpha * (neg / n), alpha).div_(alpha)
    if n != 1:
        codes.mul_(n)
    return m, alpha, codes.round_()


class DynamicScaleQuantize(torch.autograd.Function):
    """QuantGPT's module-wise dynamic scaling: alpha = gamma * mean|w|.

    Forward: u = clip(w, -alpha, alpha) / alpha, codes = round(u * n), w_q = codes * (alpha / n).
    (w_q is written as codes * step so that a packed export reproduces it bit for bit.)
    Backward (STE through round):
        dL/dw     = g                      where |w| <= alpha, else 0
        dw_q/dalpha = round(u n)/n - u     where |w| <= alpha, else sign(w)
        dL/dgamma = mean|w| * sum_i g_i * dw_q_i/dalpha
    With `detach_mean=False` the path through mean|w| also reaches w:
        dL/dw_i += gamma * sign(w_i) / N * sum_j g_j * dw_q_j/dalpha
    With `per_row`, gamma has one entry per row and every mean/sum runs over the last dim.
    With `full_grid` (qgplm's extension, not in the paper) the codes span [-(n+1), n], the whole
    b-bit range (4 levels at 2 bits instead of 3): the clip range is [-alpha (n+1)/n, alpha], and
    below it dw_q/dalpha = -(n+1)/n, the clamped code over n, as everywhere outside the range.
    """

    @staticmethod
    def forward(ctx, w: Tensor, gamma: Tensor, bits: int, per_row: bool, detach_mean: bool,
                full_grid: bool = False) -> Tensor:
        n = levels(bits)
        m, alpha, codes = _dynamic_codes(w, gamma, bits, per_row, full_grid)
        ctx.save_for_backward(w, gamma, m, alpha, codes)  # w is the parameter: one new tensor saved
        ctx.n, ctx.neg, ctx.per_row, ctx.detach_mean = n, negative_levels(bits, full_grid), per_row, detach_mean
        return codes * (alpha / n)

    @staticmethod
    def in_range(ctx, w: Tensor, alpha: Tensor) -> Tensor:
        """Where w lies in the clip range [-alpha neg/n, alpha] (the STE passes the gradient)."""
        return (w <= alpha) & (w >= -alpha * (ctx.neg / ctx.n))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        w, gamma, m, alpha, codes = ctx.saved_tensors
        grad_w = grad_out * DynamicScaleQuantize.in_range(ctx, w, alpha)
        # dL/dalpha = sum g * (codes/n - u [inside]) = <g, codes>/n - <g [inside], w>/alpha, since u = w/alpha
        # inside: two reductions, with no full-size temporary for dalpha or u
        s = _dot(grad_out, codes, ctx.per_row) / ctx.n - _dot(grad_w, w, ctx.per_row) / alpha
        grad_gamma = (m * s).reshape(gamma.shape)
        if not ctx.detach_mean:
            g = gamma.view(-1, 1) if ctx.per_row else gamma.reshape(())
            numel = w.shape[-1] if ctx.per_row else w.numel()
            grad_w = grad_w + s * g * torch.sign(w) / numel
        return grad_w, grad_gamma, None, None, None, None


def _dot(a: Tensor, b: Tensor, per_row: bool) -> Tensor:
    """sum(a * b), per row ([rows, 1]) or whole (0-d); the whole one without an [a * b] temporary."""
    if per_row:
        return torch.linalg.vecdot(a, b, dim=-1).unsqueeze(-1)
    return torch.dot(a.reshape(-1), b.reshape(-1))


def dynamic_scale_quantize(
    w: Tensor, gamma: Tensor, bits: int, per_row: bool = False, detach_mean: bool = True,
    full_grid: bool = False,
) -> Tensor:
    """Fake-quantize `w` with QuantGPT's dynamic scaling (see DynamicScaleQuantize)."""
    return DynamicScaleQuantize.apply(w, gamma, bits, per_row, detach_mean, full_grid)


def dynamic_scale_codes(w: Tensor, gamma: Tensor, bits: int, per_row: bool = False,
                        full_grid: bool = False) -> tuple[Tensor, Tensor]:
    """Integer codes in [-n, n] ([-(n+1), n] with `full_grid`) and the step alpha/n such that
    codes * step == the forward output."""
    _, alpha, codes = _dynamic_codes(w, gamma, bits, per_row, full_grid)
    return codes, alpha / levels(bits)


ACTIVATION_GRANULARITIES = ("tensor", "token")


def check_granularity(granularity: str) -> None:
    """ValueError unless `granularity` is one of ACTIVATION_GRANULARITIES."""
    if granularity not in ACTIVATION_GRANULARITIES:
        raise ValueError(f"granularity must be one of {ACTIVATION_GRANULARITIES}, got {granularity!r}")


def minmax_activation_codes(x: Tensor, bits: int = 8, symmetric: bool = False,
                            mask: Tensor | None = None,
                            granularity: str = "tensor") -> tuple[Tensor, Tensor, Tensor]:
    """(codes, step, zero point) of dynamic min-max quantization, x_q = (codes - zero) * step.

    Asymmetric (default): the range [min(x), max(x)] is split into 2^b - 1 steps with an integer
    zero point; codes in [0, 2^b - 1]. Symmetric: the range is [-max|x|, max|x|] with
    2^(b-1) - 1 levels per side; codes in [-n, n], zero point 0. The one rounding rule of the
    student's fake quantization and of the int8 inference kernels (qgplm.export.runtimes.int8).

    granularity="tensor" (the paper's): one range for the whole tensor. `mask` (bool, broadcastable
    to x): only its True elements (real tokens, qgplm.quant.token_mask) set the range, which every
    element is then quantized to; all False counts as all True. step and zero are 0-dim.
    granularity="token": one range per row of the last dimension (per token for a layer input, as
    torchao's int8 per-token activations and llama.cpp's Q8 blocks do), so one outlier token no
    longer coarsens every other token's step; step and zero have x's shape with a last dimension
    of 1. A layer input's row is one token, so padding cannot reach a real token's range; `mask`
    still selects the elements within a row that set its range (an attention row's allowed keys:
    a pad key's probability is 0 and would otherwise widen the row's range); a row with no True
    element takes its whole range.
    """
    check_granularity(granularity)
    # the reductions that set a range: over everything, or over each row's last dimension
    over = {"dim": -1, "keepdim": True} if granularity == "token" else {}
    if mask is not None:
        mask = mask | ~mask.any(**over)  # no real element: the whole tensor / row (no sync, no empty reduction)
    if symmetric:
        n = levels(bits)
        amax = x.abs().amax(**over) if mask is None else x.abs().masked_fill(~mask, 0).amax(**over)
        step = (amax / n).clamp_min(EPS)
        return torch.clamp(torch.round(x / step), -n, n), step, torch.zeros_like(step)
    if mask is None:
        lo, hi = torch.aminmax(x, **over)  # the same values as amin() / amax(), one pass
    else:
        lo, hi = x.masked_fill(~mask, float("inf")).amin(**over), x.masked_fill(~mask, float("-inf")).amax(**over)
    qmax = 2**bits - 1
    step = ((hi - lo) / qmax).clamp_min(EPS)
    zero = torch.round(-lo / step)
    return torch.clamp(torch.round(x / step) + zero, 0, qmax), step, zero


def minmax_activation_quantize(x: Tensor, bits: int = 8, symmetric: bool = False,
                               mask: Tensor | None = None, granularity: str = "tensor") -> Tensor:
    """Dynamic min-max fake quantization (`minmax_activation_codes`: per tensor, the range over the
    `mask`ed elements, or per token) with a straight-through gradient: the STE is the identity
    (elements outside a masked range are pad positions, whose values are not used).
    A half-precision x (bf16 under autocast) is quantized in fp32 and the result rounded once to
    x's dtype: in bf16 itself x / step and the STE's x + (x_q - x) would each lose code levels."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return minmax_activation_quantize(x.float(), bits, symmetric, mask, granularity).to(x.dtype)
    codes, step, zero = minmax_activation_codes(x.detach(), bits, symmetric, mask, granularity)
    xq = codes * step if symmetric else (codes - zero) * step
    return x + (xq - x).detach()
