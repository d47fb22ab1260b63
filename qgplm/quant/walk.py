"""`swap_modules`: the one module-swap walk (torchao's `quantize_(model, config, filter_fn)` shape).

Quantizing a float model, rebuilding a loaded export's quantized layers and converting them to
int8 or low-bit kernels all replace some submodules of a Hugging Face model by others. They share
the rules that make this safe on tied / shared layers, which live here once:
- every name of a module is visited (`remove_duplicate=False`): a module reachable under two
  names (a shared embedding) is replaced under both, by the *same* new module, built once;
- the replacements are collected first and assigned after the walk, so the walk never sees a
  half-swapped model.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

FilterFn = Callable[[str, nn.Module], bool]
ReplaceFn = Callable[[str, nn.Module], "nn.Module | None"]


def swap_modules(model: nn.Module, filter_fn: FilterFn, replace_fn: ReplaceFn) -> dict[str, nn.Module]:
    """Replace, in place, every submodule for which `filter_fn(name, module)` holds by
    `replace_fn(name, module)` (None: keep it). Returns {name: new module} of what was swapped.

    `replace_fn` is called once per module object: a module seen again under another name gets the
    replacement already built (a module it declined is offered again under its next name, since
    `filter_fn` may have chosen it for that name only)."""
    built: dict[int, nn.Module] = {}
    swaps: dict[str, nn.Module] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if not name or not filter_fn(name, mod):
            continue
        new = built.get(id(mod))
        if new is None:
            new = replace_fn(name, mod)
            if new is None:
                continue
            built[id(mod)] = new
        swaps[name] = new
    for name, new in swaps.items():
        model.set_submodule(name, new, strict=True)
    return swaps
