"""Quantizer modules: each holds the state of one quantized tensor (its learnable scale).

A weight quantizer is a small nn.Module attached to a quantized layer. The interface every
quantizer kind implements (QuantGPT here, the baselines in baselines.py, registered in registry.py):

- `forward(w)`: the fake-quantized weight used in the forward pass (identity when disabled); a kind
  implements `quantize(w)` and inherits it.
- `initialize(w)`: set the scale from the weight it will quantize; called once at fit start by
  the scale warm-up callback. The `initialized` buffer is saved with checkpoints, so a resumed
  run never re-initialises.
- `codes(w)`: integer codes and step with `codes * step == forward(w)` (for packed export).
- `scale_parameters()`: learnable scale tensors; they get their own optimizer group.
- `scale_bounds()`: (scale parameter, lower bound) pairs the scales must stay above; `clamp_()`
  keeps them there after an optimizer step (returns True if it had to), and `clamp_scales_` does
  it for all quantizers of a model at once, without a host sync (the training step's).

A quantizer shared by several layers (a token embedding and the LM head tied to it) is marked
`shared` by `quantize_model`, and computes its output once per forward of the model: the second
layer gets the same tensor (see `WeightQuantizer.forward`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import Tensor, nn

from qgplm.quant.functional import (
    check_granularity,
    dynamic_scale_codes,
    dynamic_scale_quantize,
    minmax_activation_quantize,
)
from qgplm.quant.registry import WEIGHT_QUANTIZERS, register_weight_quantizer
from qgplm.quant.token_mask import activation_mask

__all__ = ["WEIGHT_QUANTIZERS", "ActivationQuantizer", "DynamicScaleQuantizer", "WeightQuantizer", "clamp_scales_",
           "register_weight_quantizer"]


class WeightQuantizer(nn.Module):
    """Base class: bit-width, on/off switch, ramp-in factor and the `initialized` flag."""

    # the kind's registered name (set by register_weight_quantizer): the rule it quantizes with,
    # as the export manifest records it; distinct from the `method=` config group, which picks a
    # whole recipe (quantizer + losses + warm-up)
    scheme: ClassVar[str] = "base"
    # bit-widths the kind can represent (checked once, at config validation)
    supported_bits: ClassVar[tuple[int, ...]] = tuple(range(2, 9))

    def __init__(self, bits: int, num_rows: int | None = None):
        super().__init__()
        self.bits = int(bits)
        self.num_rows = num_rows  # set for per-row scaling (one scale per output row)
        self.enabled = True
        # Quantization ramp-in: forward = w + mix * (Q(w) - w). 1.0 = fully quantized.
        self.mix = 1.0
        self.register_buffer("initialized", torch.tensor(False), persistent=True)
        # Set by quantize_model when several layers call this quantizer (tied tables): see forward.
        self.shared = False
        self._last: tuple[tuple, Tensor, set[int]] | None = None  # (key, output, ids of the layers given it)

    @property
    def per_row(self) -> bool:
        return self.num_rows is not None

    def forward(self, w: Tensor, layer: nn.Module | None = None) -> Tensor:
        """The fake-quantized `w` (`w` itself when disabled).

        A `shared` quantizer called by a quantized `layer` reuses the tensor it computed last for
        another layer, if nothing it depends on has changed since (the same weight at the same
        in-place version, the same scale and buffer versions, mix, mode and grad mode) and this
        layer has not had it yet; a layer calling again means a new forward (micro-batches of an
        accumulated step, a recomputed checkpoint), which gets a fresh tensor and graph. On SmolLM2
        the tied 49,152 x 576 table is the embedding and the LM head, a fifth of the weights:
        quantizing it once a forward instead of twice saves that work in the forward and in the
        backward (one autograd node receives both layers' gradients, summed). The quantized model
        drops the tensor after each forward (`install_shared_output_hooks`), so it holds no memory
        between steps."""
        if not self.enabled:
            return w
        key = None
        if self.shared and layer is not None:
            key = (w.data_ptr(), tuple(w.shape), w.stride(), w._version, w.dtype, self.training,
                   torch.is_grad_enabled(), self.mix,
                   tuple(t._version for t in (*self.parameters(recurse=False), *self.buffers(recurse=False))))
            last = self._last
            if last is not None and last[0] == key and id(layer) not in last[2]:
                last[2].add(id(layer))
                return last[1]
        q = self.quantize(w)
        if self.mix < 1.0:
            q = w + self.mix * (q - w)
        if key is not None:
            self._last = (key, q, {id(layer)})
        return q

    def forget_output(self) -> None:
        """Drop the output a `shared` quantizer keeps for the other layers of the same forward."""
        self._last = None

    def __getstate__(self):  # copies and pickles never carry a forward's output (nor its graph)
        state = dict(super().__getstate__())
        state["_last"] = None
        return state

    def quantize(self, w: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def codes(self, w: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def initialize(self, w: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def scale_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters(recurse=False))

    def scale_bounds(self) -> list[tuple[nn.Parameter, float]]:
        """(scale parameter, lower bound) pairs that `clamp_` keeps valid; none by default."""
        return []

    @torch.no_grad()
    def clamp_(self) -> bool:
        """Clamp this quantizer's scales to their bounds; True if one was below (syncs: for tests/tools)."""
        flag = clamp_scales_([self])
        return bool(flag) if flag is not None else False

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_row={self.per_row}"


@torch.no_grad()
def clamp_scales_(quantizers: Iterable[WeightQuantizer]) -> Tensor | None:
    """Clamp the scales of all `quantizers` to their `scale_bounds`, in one fused operation per
    distinct bound, with no host sync: returns a bool tensor on the scales' device (True if any
    scale was below its bound), None when no quantizer has bounds. Called after every optimizer
    step, so a per-quantizer `bool(...)` (a GPU sync each, hundreds per step) is what it avoids."""
    groups: dict[tuple[float, torch.device, torch.dtype], list[nn.Parameter]] = {}
    for q in quantizers:
        for p, low in q.scale_bounds():
            groups.setdefault((float(low), p.device, p.dtype), []).append(p)
    flags = []
    for (low, _, _), params in groups.items():
        flags.append(torch.cat([p.detach().reshape(-1) for p in params]).lt(low).any())
        torch._foreach_clamp_min_([p.detach() for p in params], low)
    if not flags:
        return None
    return flags[0] if len(flags) == 1 else torch.stack(flags).any()


# Fallback gammas of the paper (gamma_init="fixed"; docs/method.md); 8-bit uses max|w|/mean|w|.
FIXED_GAMMA = {2: 1.4, 4: 3.0}


@register_weight_quantizer("quantgpt")
class DynamicScaleQuantizer(WeightQuantizer):
    """QuantGPT's quantizer: alpha = gamma * mean|w| with one learnable gamma per module (or row).

    gamma is initialised at fit start to the value minimising ||w - Q(w)||^2 (coarse-to-fine grid
    search, `gamma_init="mse"`) or to the paper's fixed values (`gamma_init="fixed"`; docs/method.md).
    `detach_mean=True` (default) stops the gradient through mean|w| into w.
    `grid="full"` (qgplm's extension) uses the whole b-bit code range [-2^(b-1), 2^(b-1) - 1]
    instead of the paper's symmetric [-n, n]: 4 levels at 2 bits ({-2, -1, 0, 1} * alpha) instead of
    ternary, the grid LSQ gets its fourth level from, at the same storage cost.
    """

    def __init__(
        self,
        bits: int,
        num_rows: int | None = None,
        gamma_init: str = "mse",
        detach_mean: bool = True,
        min_gamma: float = 1e-3,
        grid: str = "symmetric",
    ):
        super().__init__(bits, num_rows)
        if gamma_init not in ("mse", "fixed"):
            raise ValueError(f"gamma_init must be 'mse' or 'fixed', got {gamma_init!r}")
        if grid not in ("symmetric", "full"):
            raise ValueError(f"grid must be 'symmetric' or 'full', got {grid!r}")
        self.grid = grid
        self.gamma_init = gamma_init
        self.detach_mean = detach_mean
        self.min_gamma = min_gamma
        shape = (num_rows,) if num_rows is not None else ()
        self.gamma = nn.Parameter(torch.full(shape, FIXED_GAMMA.get(self.bits, 1.0)))

    def quantize(self, w: Tensor) -> Tensor:
        return dynamic_scale_quantize(w, self.gamma, self.bits, self.per_row, self.detach_mean, self.full_grid)

    def codes(self, w: Tensor) -> tuple[Tensor, Tensor]:
        return dynamic_scale_codes(w, self.gamma, self.bits, self.per_row, self.full_grid)

    @property
    def full_grid(self) -> bool:
        return self.grid == "full"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grid={self.grid}"

    @torch.no_grad()
    def initialize(self, w: Tensor) -> None:
        w = w.detach().float()
        mean = w.abs().mean(dim=-1) if self.per_row else w.abs().mean()
        top = (w.abs().amax(dim=-1) if self.per_row else w.abs().amax()) / mean.clamp_min(1e-12)
        if self.gamma_init == "fixed" or self.bits >= 8:
            value = torch.full_like(mean, FIXED_GAMMA[self.bits]) if self.bits in FIXED_GAMMA else top
        else:
            value = _mse_gamma_search(w, self.bits, self.per_row, top, self.full_grid)
        value = value.reshape(self.gamma.shape).to(self.gamma.dtype)
        if self.bits >= 8 and self.gamma_init != "fixed":
            # gamma * mean|w| must not round below max|w|: one float step up keeps every w inside
            value = torch.nextafter(value, torch.full_like(value, float("inf")))
        self.gamma.copy_(value)
        self.initialized.fill_(True)

    def scale_bounds(self) -> list[tuple[nn.Parameter, float]]:
        return [(self.gamma, self.min_gamma)]


def _mse_gamma_search(w: Tensor, bits: int, per_row: bool, top: Tensor, full_grid: bool = False,
                      points: int = 24, rounds: int = 3) -> Tensor:
    """Coarse-to-fine grid search for the gamma minimising ||w - Q_gamma(w)||^2.

    Each round evaluates `points` gammas in [lo, hi] and narrows the interval around the best.
    Large per-tensor weights are subsampled (fixed seed) to keep start-up fast on GPT-2 size.
    """
    if not per_row and w.numel() > 2**20:
        gen = torch.Generator().manual_seed(0)
        idx = torch.randint(0, w.numel(), (2**20,), generator=gen)
        w = w.reshape(-1)[idx.to(w.device)]
    lo = torch.full_like(top, 0.05)
    hi = top.clamp_min(0.1)
    best = (lo + hi) / 2
    for _ in range(rounds):
        frac = torch.linspace(0, 1, points, device=w.device, dtype=w.dtype)
        grid = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * frac  # [..., points]
        errs = torch.stack(
            [_quant_error(w, grid[..., k], bits, per_row, full_grid) for k in range(points)], dim=-1
        )
        k = errs.argmin(dim=-1, keepdim=True)
        best = grid.gather(-1, k).squeeze(-1)
        step = (hi - lo) / (points - 1)
        lo, hi = (best - step).clamp_min(1e-3), best + step
    return best


def _quant_error(w: Tensor, gamma: Tensor, bits: int, per_row: bool, full_grid: bool) -> Tensor:
    q = dynamic_scale_quantize(w, gamma, bits, per_row, True, full_grid)
    d = (w - q).pow(2)
    return d.sum(dim=-1) if per_row else d.sum()


_FROM_CONTEXT = object()


class ActivationQuantizer(nn.Module):
    """Dynamic min-max quantizer for the input of a quantized layer (no parameters).

    granularity="tensor" (the paper's): one range per tensor, taken over the real tokens' rows only:
    `mask` (bool, broadcastable to x), by default the current token mask for x
    (`qgplm.quant.token_mask.activation_mask`), so padding never changes a real token's output.
    granularity="token": one range per token (row of the last dimension): a layer input's token mask
    is not needed (a row is one token), an explicit `mask` (attention's allowed keys) is honoured."""

    def __init__(self, bits: int = 8, symmetric: bool = False, granularity: str = "tensor"):
        super().__init__()
        check_granularity(granularity)
        self.bits = int(bits)
        self.symmetric = symmetric
        self.granularity = granularity
        self.enabled = True

    def forward(self, x: Tensor, mask: Tensor | None | object = _FROM_CONTEXT) -> Tensor:
        if not self.enabled:
            return x
        if self.granularity == "token":
            mask = None if mask is _FROM_CONTEXT else mask
            return minmax_activation_quantize(x, self.bits, self.symmetric, mask, "token")
        if mask is _FROM_CONTEXT:
            rows = activation_mask(x)
            mask = None if rows is None else rows.unsqueeze(-1)
        return minmax_activation_quantize(x, self.bits, self.symmetric, mask)

    def spec(self) -> dict[str, object]:
        """The rule as the export manifest records it (`qgplm.export.format.writer`)."""
        return {"bits": self.bits, "symmetric": self.symmetric, "granularity": self.granularity}

    @classmethod
    def from_spec(cls, spec: dict[str, object]) -> ActivationQuantizer:
        """The quantizer a manifest entry describes; an export written before per-token scales
        existed has no granularity and was per tensor."""
        return cls(int(spec["bits"]), symmetric=bool(spec["symmetric"]),
                   granularity=str(spec.get("granularity", "tensor")))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, granularity={self.granularity}"
