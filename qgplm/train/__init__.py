"""The training application: the run config (config.py, validated once at start-up), the Lightning
modules (module.py), callbacks, the pipeline's stages (pipeline.py), resume, FSDP/DDP, loggers and
the run directory. The library (`qgplm.quant`, `distill`, `models`, `export`) never imports it."""
