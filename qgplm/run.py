"""`python -m qgplm.run`: the training command at the path users type; its code is `qgplm.cli.run`."""

from __future__ import annotations

from qgplm.cli.run import cli, execute, main

__all__ = ["cli", "execute", "main"]

if __name__ == "__main__":
    cli()
