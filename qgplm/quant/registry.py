"""The registry of weight-quantizer kinds: each kind declares everything qgplm needs to use it.

A kind is registered by decorating its `WeightQuantizer` subclass:

    @register_weight_quantizer("toy", callbacks=make_my_callbacks, export="codes")
    class ToyQuantizer(WeightQuantizer): ...

and selected with `method.quantizer=toy` (a kind registered by qgplm), or, for a kind defined
outside qgplm, by the import path of its class (`method.quantizer=my_pkg.quant.ToyQuantizer`):
the module is imported, which registers it. Training then adds the kind's callbacks and the
export treats it as it declares, so adding a quantizer is one module plus one `conf/method` file,
with no branch on its name anywhere in qgplm.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from qgplm.errors import QgplmError

# "codes": packed integer codes plus the step, checked to reproduce the forward bit for bit;
# "none": the kind has no integer codes (a packed export is refused with a one-line error)
EXPORT_HANDLING = ("codes", "none")


def no_callbacks() -> list[Any]:
    return []


@dataclass(frozen=True)
class QuantizerKind:
    """One weight-quantization scheme.

    factory: the quantizer class, called as factory(bits, num_rows=..., **method.quantizer_kwargs).
    callbacks: builds the extra Lightning callbacks training with this kind needs (LAQ: the
        curvature feed from Adam's state); called once per student fit. Either a callable
        returning a list, or the import path of a callable (a Callback class, say) made with no
        arguments: the path keeps qgplm.quant from importing the Lightning layer above it.
    export: how a packed export treats its weights (EXPORT_HANDLING).
    """

    name: str
    factory: type[nn.Module]
    callbacks: Callable[[], list[Any]] | str = no_callbacks
    export: str = "codes"

    def make_callbacks(self) -> list[Any]:
        """A fresh list of this kind's training callbacks."""
        if not isinstance(self.callbacks, str):
            return list(self.callbacks())
        module, _, attr = self.callbacks.rpartition(".")
        made = getattr(importlib.import_module(module), attr)()
        return made if isinstance(made, list) else [made]

    @property
    def supported_bits(self) -> tuple[int, ...]:
        return self.factory.supported_bits


QUANTIZER_KINDS: dict[str, QuantizerKind] = {}
# name -> class, the registry's view kept for callers that only need the class
WEIGHT_QUANTIZERS: dict[str, type[nn.Module]] = {}


def register_weight_quantizer(name: str, *, callbacks: Callable[[], list[Any]] | str = no_callbacks,
                              export: str = "codes") -> Callable[[type], type]:
    """Class decorator: make a quantizer available as `method.quantizer=<name>`, with what it needs."""
    if export not in EXPORT_HANDLING:
        raise ValueError(f"export={export!r}: choose one of {', '.join(EXPORT_HANDLING)}")

    def wrap(cls: type) -> type:
        cls.scheme = name
        QUANTIZER_KINDS[name] = QuantizerKind(name, cls, callbacks, export)
        WEIGHT_QUANTIZERS[name] = cls
        return cls

    return wrap


def quantizer_kind(name: str) -> QuantizerKind:
    """The kind `method.quantizer` names: a registered name, or the import path of a registered class."""
    kind = QUANTIZER_KINDS.get(name)
    if kind is None and "." in name:
        kind = _imported_kind(name)
    if kind is None:
        known = ", ".join(sorted(QUANTIZER_KINDS))
        raise QgplmError(f"method.quantizer={name!r} is not valid (unknown quantizer): choose one of {known} "
                         f"(or the import path of a class registered with register_weight_quantizer)")
    return kind


def _imported_kind(path: str) -> QuantizerKind | None:
    module, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr, None)
    except ImportError as e:
        raise QgplmError(f"method.quantizer={path}: cannot import {module} ({e}): check the path and that it is "
                         f"importable (PYTHONPATH)") from None
    kind = next((k for k in QUANTIZER_KINDS.values() if k.factory is cls), None)
    if cls is not None and kind is None:
        raise QgplmError(f"method.quantizer={path} is not a registered quantizer: decorate the class with "
                         f"@register_weight_quantizer(<name>)")
    return kind


def kind_of(quantizer: nn.Module) -> QuantizerKind | None:
    """The registered kind of a quantizer instance (None for qgplm's internal ones: identity, stored)."""
    kind = QUANTIZER_KINDS.get(getattr(quantizer, "scheme", ""))
    return kind if kind is not None and isinstance(quantizer, kind.factory) else None
