"""Baseline weight quantizers (docs/method.md, "Weight quantizers"), each a registered WeightQuantizer.

    method.quantizer=pact                learn alpha directly; d/dalpha from the clipped elements only
    method.quantizer=lsq                 learn the step s with LSQ's gradient scale
    method.quantizer=laq                 loss-aware: alpha from an alternating closed form weighted by
                                         the diagonal curvature D (Adam's sqrt(v) + eps), no learning
    method.quantizer=twn                 ternary weight networks (2 bits only)
    method.quantizer=minmax              symmetric min-max: alpha = max|w| at every forward
    method.quantizer=quantgpt_pact_grad  ablation: QuantGPT's alpha = gamma * mean|w|, with PACT's
                                         gradient for gamma (clipped elements only)

The autograd functions live here, next to the modules, so that `functional.py` stays QuantGPT's.
Every quantizer returns `codes * step` from its forward, and `codes(w)` returns the same two
tensors, so a packed export reproduces the forward bit for bit. Per-row mode (`num_rows` set,
`method.per_row=true`) gives one scale per output row; every mean / max / sum runs over the last dim.

Project defaults (the paper leaves them open, docs/method.md; they are constructor kwargs / config values):
- PACT's "fixed" initial alpha is `init_scale * mean|w|` with QuantGPT's *fallback* multiples
  (1.4 at 2 bits, 3.0 at 4 bits, max|w|/mean|w| otherwise, i.e. alpha = max|w|), those of
  `gamma_init=fixed`. QuantGPT's default initial gamma is the MSE-optimal one (`gamma_init=mse`),
  which is not the fallback: about 1.53 at 2 bits on Gaussian-initialised GPT-2 matrices (1.525 to
  1.544 over the modules of the 2 x 128 default model) against PACT's 1.40, so with the defaults
  the two start from different grids and differ in the initial clipping value as well as in how
  it is learnt. They start from the same grid only with QuantGPT's
  `method.quantizer_kwargs.gamma_init=fixed` (or PACT's `init_scale` set to QuantGPT's gammas).
  `init_alpha=<float>` sets one absolute value for every module instead.
- LSQ: s_0 = 2 mean|w| / sqrt(Q_p) (LSQ's own rule); the gradient scale counts the elements
  sharing a step (the whole tensor, or one row in per-row mode).
- LAQ: alpha starts at max|w| and runs `init_iters` alternations with D = identity at
  initialisation; during training alpha is solved once per weight value, i.e. once per optimizer
  step (`iters` alternations from the previous alpha, a persistent buffer, so checkpoints carry
  it): every other call with the same weight and D (the tied LM head after the embedding in one
  forward, the micro-batches of one accumulated step) reuses it, so a tied table and head use the
  same codes. In eval mode alpha is frozen (no update).
- Clip ranges are closed: an element with |w| == alpha (LSQ: v == bound) counts as inside.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from qgplm.quant.functional import EPS, DynamicScaleQuantize, levels
from qgplm.quant.quantizers import (
    FIXED_GAMMA,
    DynamicScaleQuantizer,
    WeightQuantizer,
    register_weight_quantizer,
)

ALL_BITS = tuple(range(2, 9))


def _check_bits(name: str, bits: int, supported: tuple[int, ...]) -> None:
    if isinstance(bits, bool) or int(bits) != bits or int(bits) not in supported:
        raise ValueError(f"quantizer {name!r} supports bits in {', '.join(map(str, supported))}, got {bits!r}")


def _reducer(per_row: bool) -> Callable[[Tensor], Tensor]:
    return (lambda t: t.sum(dim=-1, keepdim=True)) if per_row else (lambda t: t.sum())


def _view(scale: Tensor, per_row: bool) -> Tensor:
    """A per-tensor () or per-row (rows,) scale, shaped to broadcast against w."""
    return scale.view(-1, 1) if per_row else scale.reshape(())


def _abs_mean(w: Tensor, per_row: bool) -> Tensor:
    return w.abs().mean(dim=-1) if per_row else w.abs().mean()


def _abs_max(w: Tensor, per_row: bool) -> Tensor:
    return w.abs().amax(dim=-1) if per_row else w.abs().amax()


def _clip_codes(w: Tensor, alpha: Tensor, n: int) -> Tensor:
    """round(clip(w, -alpha, alpha) / alpha * n): integer codes in [-n, n] (alpha broadcastable)."""
    u = torch.maximum(torch.minimum(w, alpha), -alpha) / alpha
    return torch.round(u * n)


def _calc(w: Tensor) -> Tensor:
    """The weight, detached, in at least float32 for computing an initial scale."""
    return w.detach().to(torch.promote_types(w.dtype, torch.float32))


def _per_row_ok(w: Tensor, per_row: bool, rows: int | None) -> None:
    if per_row and (w.dim() != 2 or w.shape[0] != rows):
        raise ValueError(f"per-row quantizer for {rows} rows got a weight of shape {tuple(w.shape)}")


# ============================================================================== PACT


class PACTQuantize(torch.autograd.Function):
    """PACT with a directly learnt clipping value alpha (one per tensor or per row).

    Forward: codes = round(clip(w, -alpha, alpha) / alpha * n), w_q = codes * (alpha / n).
    Backward (STE through round, PACT's gradient for alpha):
        dL/dw     = g                          where |w| <= alpha, else 0
        dL/dalpha = sum_{|w_i| > alpha} g_i * sign(w_i)     (inside elements contribute nothing)
    """

    @staticmethod
    def forward(ctx, w: Tensor, alpha: Tensor, bits: int, per_row: bool) -> Tensor:
        n = levels(bits)
        a = _view(alpha, per_row).clamp_min(EPS)
        codes = _clip_codes(w, a, n)
        ctx.save_for_backward(w, a)
        ctx.per_row, ctx.alpha_shape = per_row, alpha.shape
        return codes * (a / n)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        w, a = ctx.saved_tensors
        inside = w.abs() <= a
        grad_w = grad_out * inside
        grad_alpha = _reducer(ctx.per_row)(torch.where(inside, torch.zeros_like(w), grad_out * torch.sign(w)))
        return grad_w, grad_alpha.reshape(ctx.alpha_shape), None, None


def pact_quantize(w: Tensor, alpha: Tensor, bits: int, per_row: bool = False) -> Tensor:
    return PACTQuantize.apply(w, alpha, bits, per_row)


def pact_codes(w: Tensor, alpha: Tensor, bits: int, per_row: bool = False) -> tuple[Tensor, Tensor]:
    n = levels(bits)
    a = _view(alpha, per_row).clamp_min(EPS)
    return _clip_codes(w, a, n), a / n


@register_weight_quantizer("pact")
class PACTQuantizer(WeightQuantizer):
    """PACT: w clipped to [-alpha, alpha] with a learnable alpha, n = 2^(b-1)-1 levels per side.

    Initial alpha ("a fixed value", see docs/method.md): `init_alpha` if given (the same absolute value for
    every module), else `init_scale * mean|w|` with `init_scale` defaulting to QuantGPT's fixed
    multiples (1.4 at 2 bits, 3.0 at 4 bits, max|w|/mean|w| at other bit-widths).
    """

    supported_bits = ALL_BITS

    def __init__(self, bits: int, num_rows: int | None = None, init_alpha: float | None = None,
                 init_scale: float | None = None, min_alpha: float = 1e-6):
        _check_bits("pact", bits, self.supported_bits)
        super().__init__(bits, num_rows)
        if init_alpha is not None and init_alpha <= 0:
            raise ValueError(f"pact: init_alpha must be > 0, got {init_alpha}")
        if init_scale is not None and init_scale <= 0:
            raise ValueError(f"pact: init_scale must be > 0, got {init_scale}")
        self.init_alpha, self.init_scale, self.min_alpha = init_alpha, init_scale, min_alpha
        shape = (num_rows,) if num_rows is not None else ()
        self.alpha = nn.Parameter(torch.full(shape, 1.0 if init_alpha is None else float(init_alpha)))

    def quantize(self, w: Tensor) -> Tensor:
        _per_row_ok(w, self.per_row, self.num_rows)
        return pact_quantize(w, self.alpha, self.bits, self.per_row)

    def codes(self, w: Tensor) -> tuple[Tensor, Tensor]:
        return pact_codes(w, self.alpha, self.bits, self.per_row)

    @torch.no_grad()
    def initialize(self, w: Tensor) -> None:
        w = _calc(w)
        if self.init_alpha is not None:
            value = torch.full_like(self.alpha, float(self.init_alpha))
        else:
            mean = _abs_mean(w, self.per_row)
            if self.init_scale is not None:
                value = self.init_scale * mean
            elif self.bits in FIXED_GAMMA:
                value = FIXED_GAMMA[self.bits] * mean
            else:  # alpha = max|w|, one float step up so that no weight is clipped at start
                top = _abs_max(w, self.per_row)
                value = torch.nextafter(top, torch.full_like(top, float("inf")))
        self.alpha.copy_(value.reshape(self.alpha.shape).to(self.alpha.dtype).clamp_min(self.min_alpha))
        self.initialized.fill_(True)

    def scale_bounds(self) -> list[tuple[nn.Parameter, float]]:
        return [(self.alpha, self.min_alpha)]

    def extra_repr(self) -> str:
        init = f"init_alpha={self.init_alpha}" if self.init_alpha is not None else f"init_scale={self.init_scale}"
        return f"{super().extra_repr()}, {init}"


# ============================================================================== LSQ


def lsq_bounds(bits: int, symmetric: bool = False) -> tuple[int, int]:
    """(Q_n, Q_p) = (2^(b-1), 2^(b-1) - 1): codes lie in [-Q_n, Q_p]. symmetric: Q_n = Q_p (the
    grid of QuantGPT, PACT and TWN: ternary at 2 bits), for comparing scale learning alone."""
    qp = 2 ** (bits - 1) - 1
    return (qp if symmetric else qp + 1), qp


class LSQQuantize(torch.autograd.Function):
    """LSQ: v = w / s, codes = clamp(round(v), -Q_n, Q_p), w_q = codes * s.

    Backward:
        dL/dw = g                               where -Q_n <= v <= Q_p, else 0
        dL/ds = g_s * sum_i g_i * (round(v_i) - v_i   inside
                                   -Q_n               v_i < -Q_n
                                   Q_p                v_i > Q_p)
    with g_s = 1 / sqrt(N * Q_p), N the number of elements sharing s (tensor, or row).
    """

    @staticmethod
    def forward(ctx, w: Tensor, step: Tensor, bits: int, per_row: bool, symmetric: bool = False) -> Tensor:
        qn, qp = lsq_bounds(bits, symmetric)
        s = _view(step, per_row).clamp_min(EPS)
        v = w / s
        codes = torch.clamp(torch.round(v), -qn, qp)
        ctx.save_for_backward(v, codes)
        ctx.per_row, ctx.step_shape, ctx.qn, ctx.qp = per_row, step.shape, qn, qp
        return codes * s

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        v, codes = ctx.saved_tensors
        inside = (v >= -ctx.qn) & (v <= ctx.qp)
        grad_w = grad_out * inside
        numel = v.shape[-1] if ctx.per_row else v.numel()
        g_scale = 1.0 / (numel * ctx.qp) ** 0.5
        ds = torch.where(inside, codes - v, codes)  # outside, codes is the clamp bound
        grad_s = _reducer(ctx.per_row)(grad_out * ds) * g_scale
        return grad_w, grad_s.reshape(ctx.step_shape), None, None, None


def lsq_quantize(w: Tensor, step: Tensor, bits: int, per_row: bool = False, symmetric: bool = False) -> Tensor:
    return LSQQuantize.apply(w, step, bits, per_row, symmetric)


def lsq_codes(w: Tensor, step: Tensor, bits: int, per_row: bool = False,
              symmetric: bool = False) -> tuple[Tensor, Tensor]:
    qn, qp = lsq_bounds(bits, symmetric)
    s = _view(step, per_row).clamp_min(EPS)
    return torch.clamp(torch.round(w / s), -qn, qp), s


@register_weight_quantizer("lsq")
class LSQQuantizer(WeightQuantizer):
    """LSQ: learnable step s, codes in [-2^(b-1), 2^(b-1)-1] (asymmetric: b=2 gives {-2,-1,0,1}),
    or with `symmetric=True` in [-(2^(b-1)-1), 2^(b-1)-1] (b=2: ternary, QuantGPT's grid).

    s_0 = 2 mean|w| / sqrt(Q_p) (LSQ's rule, per tensor or per row).
    """

    supported_bits = ALL_BITS

    def __init__(self, bits: int, num_rows: int | None = None, min_step: float = 1e-8, symmetric: bool = False):
        _check_bits("lsq", bits, self.supported_bits)
        super().__init__(bits, num_rows)
        self.min_step, self.symmetric = min_step, symmetric
        shape = (num_rows,) if num_rows is not None else ()
        self.step = nn.Parameter(torch.ones(shape))

    def quantize(self, w: Tensor) -> Tensor:
        _per_row_ok(w, self.per_row, self.num_rows)
        return lsq_quantize(w, self.step, self.bits, self.per_row, self.symmetric)

    def codes(self, w: Tensor) -> tuple[Tensor, Tensor]:
        return lsq_codes(w, self.step, self.bits, self.per_row, self.symmetric)

    @torch.no_grad()
    def initialize(self, w: Tensor) -> None:
        _, qp = lsq_bounds(self.bits, self.symmetric)
        value = 2 * _abs_mean(_calc(w), self.per_row) / qp**0.5
        self.step.copy_(value.reshape(self.step.shape).to(self.step.dtype).clamp_min(self.min_step))
        self.initialized.fill_(True)

    def scale_bounds(self) -> list[tuple[nn.Parameter, float]]:
        return [(self.step, self.min_step)]


# ============================================================================== LAQ


def laq_alpha_step(w: Tensor, alpha: Tensor, n: int, d: Tensor | None, per_row: bool) -> Tensor:
    """One alternation: b = round(clip(w/alpha, -1, 1) * n) / n, then alpha = sum(D b w) / sum(D b^2),
    the minimiser of sum D (w - alpha b)^2 for that b, so every alternation lowers that objective.

    The paper writes alpha = sum|b D w| / sum|b D|: the same at 2 bits (b in {-1, 0, 1}, b^2 = |b|),
    but at 4-8 bits, where b takes the fractions k/n, it is a D-weighted mean of |w| over the
    non-zero codes, far below the least-squares clipping value (measured: 8-bit LAQ students at
    1.7x the teacher's PPL with it), so qgplm uses the least-squares form at every bit-width.
    `alpha` is () or (rows,); returns the same shape. Where every b is 0 the old alpha is kept.
    """
    a = _view(alpha, per_row).clamp_min(EPS)
    b = _clip_codes(w, a, n) / n
    bd = b * d if d is not None else b
    red = (lambda t: t.sum(dim=-1)) if per_row else (lambda t: t.sum())
    num, den = red(bd * w), red(bd * b)
    new = torch.where(den > 0, num / den.clamp_min(EPS), alpha)
    return new.clamp_min(EPS).reshape(alpha.shape)


class STEClipQuantize(torch.autograd.Function):
    """w_q = codes * step (computed outside); dL/dw = g where |w| <= alpha, else 0 (no scale gradient)."""

    @staticmethod
    def forward(ctx, w: Tensor, codes: Tensor, step: Tensor, alpha: Tensor) -> Tensor:
        ctx.save_for_backward(w.abs() <= alpha)
        return codes * step

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (inside,) = ctx.saved_tensors
        return grad_out * inside, None, None, None


# LAQ's alpha needs D = sqrt(Adam's second moment), fed from the optimizer every step by its callback
@register_weight_quantizer("laq", callbacks="qgplm.train.callbacks.laq.LAQCurvatureCallback")
class LAQQuantizer(WeightQuantizer):
    """Loss-aware quantization: alpha from the curvature-weighted alternating closed form.

    Once per training step it runs `iters` alternations of
        b     = round(clip(w / alpha, -1, 1) * n) / n
        alpha = sum(D * b * w) / sum(D * b^2)      (the paper's formula at 2 bits; see laq_alpha_step)
    starting from the previous alpha (persistent buffer); every training forward quantizes with it:
    w_q = alpha * round(clip(w/alpha, -1, 1) * n) / n. D (same shape as w) is set from outside with
    `set_curvature(D)` (LAQCurvatureCallback: D = sqrt(Adam's exp_avg_sq) + eps); identity until set.
    "Once per step" = once per value of (weight, D): alpha is re-solved only when the weight tensor
    was modified in place since the last solve (its version counter: the optimizer step) or D was
    set again, so the two calls of a forward with a tied embedding / LM head (one quantizer, one
    Parameter) and the micro-batches of an accumulated step all use one alpha and one set of codes
    (solving per call would give one table two grids within a step). In eval mode alpha is
    frozen. Backward: STE to w inside [-alpha, alpha], 0 outside; alpha has no learnable parameter.
    """

    supported_bits = ALL_BITS

    def __init__(self, bits: int, num_rows: int | None = None, iters: int = 2, init_iters: int = 10):
        _check_bits("laq", bits, self.supported_bits)
        super().__init__(bits, num_rows)
        if iters < 0 or init_iters < 0:
            raise ValueError(f"laq: iters and init_iters must be >= 0, got {iters}, {init_iters}")
        self.iters, self.init_iters = int(iters), int(init_iters)
        shape = (num_rows,) if num_rows is not None else ()
        # 0 = not set yet: the first forward starts from max|w|
        self.register_buffer("alpha", torch.zeros(shape), persistent=True)
        # curvature comes from the optimizer state each step: not part of the checkpoint
        self.register_buffer("curvature", None, persistent=False)
        # what alpha was last solved for (weight tensor, its version, layout, D): not checkpointed,
        # a resumed run solves at its first forward as the uninterrupted one does after its step
        self._curvature_token = 0
        self._solved_for: tuple | None = None
        self._solved_ref: weakref.ref | None = None

    def set_curvature(self, d: Tensor | None) -> None:
        """Diagonal curvature D, shaped like the (oriented, [out, in]) weight; None = identity."""
        if d is not None:
            d = d.detach()
            if not torch.isfinite(d).all() or (d < 0).any():
                raise ValueError("laq: the curvature D must be finite and >= 0")
        self.curvature = d
        self._curvature_token += 1  # a new D: solve again at the next training forward

    def _curvature_for(self, w: Tensor) -> Tensor | None:
        d = self.curvature
        if d is None:
            return None
        if d.shape != w.shape:
            raise ValueError(f"laq: curvature of shape {tuple(d.shape)} for a weight of shape {tuple(w.shape)}")
        return d.to(device=w.device, dtype=w.dtype)

    @torch.no_grad()
    def _start(self, w: Tensor) -> Tensor:
        top = _abs_max(w, self.per_row).reshape(self.alpha.shape).to(self.alpha.dtype)
        return torch.where(self.alpha > 0, self.alpha, top)

    @torch.no_grad()
    def solve(self, w: Tensor, alpha: Tensor, iters: int, d: Tensor | None = None) -> Tensor:
        """Run `iters` alternations from `alpha`; returns the new alpha (does not store it)."""
        n = levels(self.bits)
        wd = w.detach().to(alpha.dtype)
        for _ in range(iters):
            alpha = laq_alpha_step(wd, alpha, n, d, self.per_row)
        return alpha

    def _solve_key(self, w: Tensor) -> tuple:
        """What alpha is solved for: the weight tensor (Conv1D's weight.t() is a new view per call,
        so its base), its in-place version counter, its layout, and the D last set."""
        base = w._base if w._base is not None else w
        return base, (base._version, tuple(w.shape), w.stride(), w.storage_offset(), w.dtype, w.device,
                      self._curvature_token)

    def _forget_solve(self) -> None:
        self._solved_ref, self._solved_for = None, None

    def __getstate__(self):  # a weakref does not pickle; the next training forward solves again
        state = dict(super().__getstate__())
        state["_solved_ref"], state["_solved_for"] = None, None
        return state

    def quantize(self, w: Tensor) -> Tensor:
        _per_row_ok(w, self.per_row, self.num_rows)
        if self.training:
            base, key = self._solve_key(w)
            if self._solved_ref is None or self._solved_ref() is not base or self._solved_for != key:
                with torch.no_grad():
                    d = self._curvature_for(w)
                    new = self.solve(w, self._start(w), self.iters, None if d is None else d.to(self.alpha.dtype))
                    self.alpha.copy_(new)
                self._solved_ref, self._solved_for = weakref.ref(base), key
        codes, step = self.codes(w)
        a = _view(self.alpha, self.per_row).clamp_min(EPS).to(w.dtype)
        return STEClipQuantize.apply(w, codes, step, a)

    @torch.no_grad()
    def codes(self, w: Tensor) -> tuple[Tensor, Tensor]:
        n = levels(self.bits)
        a = _view(self._start(w), self.per_row).clamp_min(EPS).to(w.dtype)
        return _clip_codes(w.detach(), a, n), a / n

    @torch.no_grad()
    def initialize(self, w: Tensor) -> None:
        w = _calc(w)
        top = _abs_max(w, self.per_row).reshape(self.alpha.shape).to(self.alpha.dtype)
        self.alpha.copy_(self.solve(w, top, self.init_iters))
        self.initialized.fill_(True)
        self._forget_solve()

    def scale_parameters(self) -> list[nn.Parameter]:
        return []

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, iters={self.iters}"


# ============================================================================== TWN and min-max


class IdentitySTE(torch.autograd.Function):
    """w_q = codes * step (computed outside, from the detached w); dL/dw = g everywhere."""

    @staticmethod
    def forward(ctx, w: Tensor, codes: Tensor, step: Tensor) -> Tensor:
        return codes * step

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return grad_out, None, None


def twn_codes(w: Tensor, per_row: bool = False, threshold: float = 0.7) -> tuple[Tensor, Tensor]:
    """TWN: delta = threshold * mean|w|, codes = sign(w) * [|w| > delta], alpha = mean of |w| over |w| > delta."""
    w = w.detach()
    mean = w.abs().mean(dim=-1, keepdim=True) if per_row else w.abs().mean()
    keep = w.abs() > threshold * mean
    red = _reducer(per_row)
    alpha = red(w.abs() * keep) / red(keep.to(w.dtype)).clamp_min(1)
    return torch.sign(w) * keep, alpha.clamp_min(EPS)


class PerForwardQuantizer(WeightQuantizer):
    """A quantizer with nothing to learn: `codes` recomputes the scale from w at every forward,
    the backward is the identity STE to w, and initialisation only marks it initialised."""

    def quantize(self, w: Tensor) -> Tensor:
        _per_row_ok(w, self.per_row, self.num_rows)
        codes, step = self.codes(w)
        return IdentitySTE.apply(w, codes, step)

    @torch.no_grad()
    def initialize(self, w: Tensor) -> None:
        self.initialized.fill_(True)


@register_weight_quantizer("twn")
class TWNQuantizer(PerForwardQuantizer):
    """Ternary weight networks (2 bits only): w_q = alpha * sign(w) * [|w| > 0.7 mean|w|], with
    alpha the mean of |w| over the kept elements; recomputed every forward; identity STE to w."""

    supported_bits = (2,)

    def __init__(self, bits: int, num_rows: int | None = None, threshold: float = 0.7):
        _check_bits("twn", bits, self.supported_bits)
        super().__init__(bits, num_rows)
        if not 0 <= threshold < 1:
            raise ValueError(f"twn: threshold must be in [0, 1), got {threshold}")
        self.threshold = threshold

    @torch.no_grad()
    def codes(self, w: Tensor) -> tuple[Tensor, Tensor]:
        return twn_codes(w, self.per_row, self.threshold)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"


def minmax_codes(w: Tensor, bits: int, per_row: bool = False) -> tuple[Tensor, Tensor]:
    """Symmetric min-max: step = max|w| / n, codes = clamp(round(w / step), -n, n)."""
    n = levels(bits)
    w = w.detach()
    top = w.abs().amax(dim=-1, keepdim=True) if per_row else w.abs().amax()
    step = (top / n).clamp_min(EPS)
    return torch.clamp(torch.round(w / step), -n, n), step


@register_weight_quantizer("minmax")
class MinMaxQuantizer(PerForwardQuantizer):
    """Symmetric min-max weight quantizer: alpha = max|w| at every forward, identity STE to w."""

    supported_bits = ALL_BITS

    def __init__(self, bits: int, num_rows: int | None = None):
        _check_bits("minmax", bits, self.supported_bits)
        super().__init__(bits, num_rows)

    @torch.no_grad()
    def codes(self, w: Tensor) -> tuple[Tensor, Tensor]:
        return minmax_codes(w, self.bits, self.per_row)


# ============================================================================== ablation


class PACTGradDynamicScaleQuantize(DynamicScaleQuantize):
    """QuantGPT's forward (alpha = gamma * mean|w|) with PACT's gradient for the scale:
        dL/dalpha = sum_{|w_i| > alpha} g_i * sign(w_i)      (inside elements contribute nothing)
        dL/dgamma = mean|w| * dL/dalpha;  dL/dw = g inside, 0 outside
    With `detach_mean=False`: dL/dw_i += gamma * sign(w_i) / N * dL/dalpha, as in QuantGPT.
    With `full_grid`, sign(w_i) below the range is the clamped code over n, -(n+1)/n.
    """

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        w, gamma, m, alpha, codes = ctx.saved_tensors
        inside = DynamicScaleQuantize.in_range(ctx, w, alpha)
        grad_w = grad_out * inside
        s = _reducer(ctx.per_row)(torch.where(inside, torch.zeros_like(w), grad_out * codes / ctx.n))
        grad_gamma = (m * s).reshape(gamma.shape)
        if not ctx.detach_mean:
            g = _view(gamma, ctx.per_row)
            numel = w.shape[-1] if ctx.per_row else w.numel()
            grad_w = grad_w + s * g * torch.sign(w) / numel
        return grad_w, grad_gamma, None, None, None, None


def pact_grad_dynamic_scale_quantize(w: Tensor, gamma: Tensor, bits: int, per_row: bool = False,
                                     detach_mean: bool = True, full_grid: bool = False) -> Tensor:
    return PACTGradDynamicScaleQuantize.apply(w, gamma, bits, per_row, detach_mean, full_grid)


@register_weight_quantizer("quantgpt_pact_grad")
class PACTGradDynamicScaleQuantizer(DynamicScaleQuantizer):
    """Ablation: QuantGPT's quantizer (same forward, init and codes) whose gamma gradient is PACT's,
    from the clipped elements only."""

    def __init__(self, bits: int, num_rows: int | None = None, **kwargs):
        _check_bits("quantgpt_pact_grad", bits, self.supported_bits)
        super().__init__(bits, num_rows, **kwargs)

    def quantize(self, w: Tensor) -> Tensor:
        return pact_grad_dynamic_scale_quantize(w, self.gamma, self.bits, self.per_row, self.detach_mean,
                                                self.full_grid)
