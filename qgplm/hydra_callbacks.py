"""`qgplm.hydra_callbacks.RunDirGuard`, the path that earlier Hydra configs name in `hydra.callbacks`;
the class is `qgplm.train.hydra_callbacks.RunDirGuard`."""

from qgplm.train.hydra_callbacks import RunDirGuard

__all__ = ["RunDirGuard"]
