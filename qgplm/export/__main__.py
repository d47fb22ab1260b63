"""`python -m qgplm.export`: the export command at the path users type. Its code is `qgplm.cli.export`,
run here as the main module: the library holds no command line and imports none (nothing imports
this file; Python runs it only for `-m qgplm.export`)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("qgplm.cli.export", run_name="__main__", alter_sys=True)
