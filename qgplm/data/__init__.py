"""Data: task sources (builtin generator, local files, hub) and datamodules."""
