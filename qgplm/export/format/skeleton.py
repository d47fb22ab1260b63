"""A Hugging Face model built without its float weights: the skeleton `load_quantized` fills.

Building the model class from its config the ordinary way allocates every float parameter (GPT-2
small: 475 MiB) only for the loader to replace them by packed codes or kernels; that is what made
the int8 and low-bit loaders as large as the FP32 model while loading, and glibc kept much of it
resident afterwards. Here every *parameter* is moved to the meta device as the module registers it
(the constructor's `torch.empty` is never touched, so it never becomes resident and is freed at once),
while *buffers* stay real: non-persistent buffers (rotary `inv_freq`, causal masks, position ids)
are not in the export, and computing them in the constructor, exactly as the un-patched class does,
is the one way that is right for every architecture. This is accelerate's
`init_empty_weights(include_buffers=False)`, without the dependency.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from qgplm.errors import QgplmError


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within the block, every parameter a module registers is replaced by a meta tensor of the
    same shape, dtype, class and requires_grad (a parameter already on meta, a tied one being
    registered again, is kept as it is, so ties made in the constructor survive)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        p = module._parameters.get(name)
        if p is None or p.device.type == "meta":
            return
        if type(p) is nn.Parameter:
            new = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
            new.__dict__.update(p.__dict__)  # attributes set on the parameter (HF's flags)
        else:  # a parameter subclass: accelerate's convention, its attributes as keyword arguments
            extra: dict[str, Any] = {**p.__dict__, "requires_grad": p.requires_grad}
            new = type(p)(p.detach().to("meta"), **extra)
        module._parameters[name] = new

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of `model` still on the meta device (none, once loaded)."""
    named: list[tuple[str, Tensor]] = [*model.named_parameters(remove_duplicate=False),
                                       *model.named_buffers(remove_duplicate=False)]
    return [name for name, t in named if t.device.type == "meta"]


def check_materialised(model: nn.Module, what: str) -> None:
    """Refuse a model that kept a meta tensor: its forward would fail far from the cause."""
    left = meta_tensors(model)
    if left:
        raise QgplmError(f"{what}: {len(left)} tensor(s) were not filled from the export ({', '.join(left[:3])}): "
                         f"the export does not match its config.json, export the model again")
