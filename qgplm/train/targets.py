"""Which classes a config may name with `_target_` (trainer, callbacks, loggers).

`hydra.utils.instantiate` calls whatever `_target_` names, so an experiment file someone hands
you could say `_target_: os.system` and run a command. qgplm instantiates only classes inside an
allowlist of module prefixes: Lightning's (`lightning.pytorch.`), FSDP's settings classes
(`torch.distributed.fsdp.`) and qgplm's own. A class of your own (a callback, a logger) is
allowed by naming its module prefix in the environment variable `QGPLM_ALLOW_TARGETS`
(comma-separated, e.g. `QGPLM_ALLOW_TARGETS=my_pkg.callbacks.`): a decision made on the command
line of the person running qgplm, never in a file. Every `_target_` of a section is checked
before any of it is built (before anything trains), and must name a class, not a function.
Task classes (`task._target_`) and quantizer kinds (`method.quantizer`) are resolved by their own
loaders, which only accept subclasses of qgplm's Task and registered quantizer classes.
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from qgplm.errors import QgplmError

ALLOWED_PREFIXES = ("lightning.pytorch.", "torch.distributed.fsdp.", "qgplm.")
ENV = "QGPLM_ALLOW_TARGETS"


def allowed_prefixes() -> tuple[str, ...]:
    extra = tuple(p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip())
    return ALLOWED_PREFIXES + extra


def _targets(node: Any, path: str) -> list[tuple[str, Any]]:
    """(config key, value) of every `_target_` in `node`, depth first."""
    found = []
    if isinstance(node, (DictConfig, ListConfig)):  # walked unresolved: a _target_ is never an interpolation here
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{path}.{k}" if path else str(k)
            if k == "_target_":
                found.append((key, v))
            else:
                found += _targets(v, key)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            found += _targets(v, f"{path}[{i}]")
    return found


def check_targets(node: Any, section: str) -> None:
    """Refuse a `_target_` outside the allowlist, or one that is not a class, before anything is built."""
    from hydra.utils import get_class

    if node is None:
        return
    prefixes = allowed_prefixes()
    for key, target in _targets(node, section):
        name = str(target)
        shown = name if name.isprintable() else repr(name)  # a newline in the value must not split the error line
        if not name.startswith(prefixes):
            raise QgplmError(f"{key}={shown} is not an allowed class: qgplm instantiates only classes under "
                             f"{', '.join(prefixes)}; to allow your own, set {ENV}=<its module prefix> in the "
                             f"environment (docs/security.md)")
        try:
            obj = get_class(name)  # imports the module of an allowed prefix; refuses a function
        except Exception as e:  # noqa: BLE001 - Hydra wraps import and attribute errors alike
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise QgplmError(f"{key}={shown} is not an importable class ({reason}): name a class as "
                             f"module.Class") from None
        if not isinstance(obj, type):  # get_class already refuses these; kept should Hydra change
            raise QgplmError(f"{key}={shown} is not an importable class: name a class as module.Class")


def instantiate_checked(cfg: Any, section: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate after check_targets."""
    from hydra.utils import instantiate

    check_targets(cfg, section)
    return instantiate(cfg, **kwargs)
