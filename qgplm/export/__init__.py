"""Packed export of quantized models and their loading for inference.

    export_model(model, out_dir, tokenizer)   -> ExportReport   (format/writer.py, format/report.py)
    export_onnx / export_gguf (converters/)   -> ExportReport, the same type for every format
    load_quantized(dir, mode="dequantize"|"int8"|"lowbit") -> HF model   (loader.py)
    python -m qgplm.export ckpt=<run dir or .ckpt> out=<dir>     (__main__.py)
"""

from qgplm.export.format.report import ExportReport
from qgplm.export.format.writer import export_model
from qgplm.export.loader import load_export_tokenizer, load_quantized

__all__ = ["ExportReport", "export_model", "load_export_tokenizer", "load_quantized"]
