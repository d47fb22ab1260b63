"""The commands: `python -m qgplm.run` (run.py, Hydra), `python -m qgplm.export` (export.py) and
`python -m qgplm.generate` (generate.py); args.py parses the `key=value` arguments of the last two."""
