"""`swap_modules`, the one walk every module swap uses: shared modules are replaced once, under
every name, and a module declined under one name is offered again under the next."""

from __future__ import annotations

from torch import nn

from qgplm.quant import swap_modules


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = self.a  # the same module under a second name
        self.c = nn.Linear(2, 2)
        self.norm = nn.LayerNorm(2)


def test_a_shared_module_is_replaced_by_one_new_module_under_every_name():
    model, calls = Shared(), []

    def replace(name, mod):
        calls.append(name)
        return nn.Identity()

    swapped = swap_modules(model, lambda name, mod: isinstance(mod, nn.Linear), replace)
    assert calls == ["a", "c"]  # built once per module object
    assert set(swapped) == {"a", "b", "c"}
    assert model.a is model.b and isinstance(model.a, nn.Identity) and model.c is not model.a
    assert isinstance(model.norm, nn.LayerNorm)  # filtered out: untouched


def test_a_declined_module_is_offered_again_under_its_next_name():
    model, calls = Shared(), []

    def replace_only_b(name, mod):
        calls.append(name)
        return nn.Identity() if name == "b" else None

    swapped = swap_modules(model, lambda name, mod: name in ("a", "b"), replace_only_b)
    assert calls == ["a", "b"] and set(swapped) == {"b"}
    assert isinstance(model.b, nn.Identity) and isinstance(model.a, nn.Linear)
