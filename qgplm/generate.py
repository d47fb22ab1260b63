"""`python -m qgplm.generate`: text from a packed export at the path users type; its code is `qgplm.cli.generate`."""

from __future__ import annotations

from qgplm.cli.args import run_main
from qgplm.cli.generate import main

__all__ = ["main"]

if __name__ == "__main__":
    run_main(main)
