"""ExportReport (qgplm/export/format/report.py): the one report type every export format returns, its byte
counts checked against the files on disk and its bits per weight against hand-computed block layouts."""

from __future__ import annotations

import json
import math
import os

import pytest

from qgplm.export import ExportReport, export_model
from qgplm.export.format.manifest import MANIFEST, WEIGHTS
from qgplm.quant.size import MIB
from tests.test_export import student as tiny_student

pytest.importorskip("onnx")
pytest.importorskip("gguf")
from qgplm.export.converters.gguf import GGUF_FILE, export_gguf  # noqa: E402
from qgplm.export.converters.onnx import DATA_FILE, ONNX_FILE, PAST_FILE, export_onnx  # noqa: E402
from tests.test_gguf import gpt2_256, student  # noqa: E402


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """A 2-bit GPT-2 (rows of 256: TQ2_0 and MatMulNBits blocks of 64 fit exactly) in every format."""
    tmp = tmp_path_factory.mktemp("report")
    packed = export_model(student(2, model=gpt2_256(layers=1)), tmp / "e")
    return {"qgplm": packed, "onnx": export_onnx(tmp / "e", tmp / "o"), "gguf": export_gguf(tmp / "e", tmp / "g"),
            "numel": sum(p.numel() for p in gpt2_256(layers=1).parameters()), "dir": tmp / "e"}


@pytest.mark.parametrize("fmt, names", [("qgplm", [WEIGHTS]), ("onnx", [ONNX_FILE, PAST_FILE, DATA_FILE]),
                                        ("gguf", [GGUF_FILE])])
def test_every_format_reports_its_files_as_on_disk(reports, fmt, names):
    rep = reports[fmt]
    assert type(rep) is ExportReport and rep.format == fmt
    assert list(rep.files) == names
    for name in names:
        assert rep.files[name] == os.path.getsize(os.path.join(rep.out_dir, name))
    assert rep.file_bytes == sum(os.path.getsize(os.path.join(rep.out_dir, n)) for n in names)
    # the same tensors, all FP32: the float model's parameters (the tied LM head once)
    assert rep.fp32_bytes == 4 * reports["numel"] and rep.weights == reports["numel"]
    assert rep.ratio == rep.fp32_bytes / rep.file_bytes
    assert rep.bits_per_weight == 8 * rep.file_bytes / rep.weights


def test_quantized_bits_per_weight_are_each_formats_layout(reports):
    q, o, g = reports["qgplm"], reports["onnx"], reports["gguf"]
    n = q.quant_weights
    assert n == o.quant_weights == g.quant_weights > 0
    tensors = len(json.loads((reports["dir"] / MANIFEST).read_text())["packed"])
    # qgplm: 2-bit codes packed densely, one fp32 step per tensor; the rest of the file is FP32 and header
    assert (q.codes_bytes, q.scales_bytes, q.quant_bytes) == (n // 4, 4 * tensors, n // 4 + 4 * tensors)
    assert q.fp_bytes == 4 * (q.weights - n) and q.file_bytes > q.codes_bytes + q.scales_bytes + q.fp_bytes
    # onnx: MatMulNBits, 2-bit codes and one fp32 scale per block of 64; gguf: TQ2_0, 64 bytes + fp16 per 256
    assert o.quant_bits_per_weight == 2 + 32 / 64 and g.quant_bits_per_weight == 66 * 8 / 256
    assert set(g.types.values()) == {"TQ2_0", "F32"} and not g.held_as and 0 < g.max_step_rounding < 2**-11
    # per-format detail stays empty where a format has none
    assert o.codes_bytes is None and g.codes_bytes is None and not q.types and q.max_step_rounding is None


def test_tables_print_each_formats_lines(reports):
    tables = {f: reports[f].table() for f in ("qgplm", "onnx", "gguf")}
    for fmt, table in tables.items():
        rep = reports[fmt]
        for name, b in rep.files.items():
            assert f"{name} on disk".ljust(28) + f"{b / MIB:>10.2f} MiB" in table
        assert f"{'compression':<28}{rep.ratio:>10.2f} x" in table and "bits per weight" in table
    assert "packed codes" in tables["qgplm"] and "packed codes" not in tables["onnx"] + tables["gguf"]
    assert "ONNX total" in tables["onnx"] and "total" not in tables["qgplm"] + tables["gguf"]
    assert "TQ2_0" in tables["gguf"] and "step rounding" in tables["gguf"]


def test_as_dict_is_json_and_the_manifest_size(reports):
    for fmt in ("qgplm", "onnx", "gguf"):
        d = json.loads(json.dumps(reports[fmt].as_dict()))
        assert d["format"] == fmt and d["file_bytes"] == reports[fmt].file_bytes and d["ratio"] > 1
        assert d["files"] == reports[fmt].files and "bits_per_weight" in d
    d = reports["qgplm"].as_dict()
    assert {"out_dir", "codes_bytes", "scales_bytes", "fp_bytes", "file_bytes", "fp32_bytes", "ratio"} <= set(d)
    assert "types" not in d and "notes" not in d and "codes_bytes" not in reports["gguf"].as_dict()
    size = json.loads((reports["dir"] / MANIFEST).read_text())["size"]
    assert size == {k: v for k, v in d.items() if k != "out_dir"}


def test_hand_made_report_table_and_dict():
    rep = ExportReport("out", "onnx", {"a.onnx": MIB, "a.data": 3 * MIB}, 32 * MIB, weights=2 * MIB)
    assert rep.table().splitlines() == [
        "a.onnx on disk                    1.00 MiB",
        "a.data on disk                    3.00 MiB",
        "ONNX total                        4.00 MiB",
        "FP32 tensors (reference)         32.00 MiB",
        "compression                       8.00 x",
        "bits per weight                 16.000 (file)",
    ]
    assert rep.quant_bits_per_weight is None and math.isclose(rep.bits_per_weight, 16.0)
    assert rep.as_dict() == {"out_dir": "out", "format": "onnx", "files": {"a.onnx": MIB, "a.data": 3 * MIB},
                             "fp32_bytes": 32 * MIB, "weights": 2 * MIB, "quant_weights": 0, "quant_bytes": 0,
                             "file_bytes": 4 * MIB, "ratio": 8.0, "bits_per_weight": 16.0}


def test_tiny_packed_export_report_matches_its_file(tmp_path):
    """3-bit codes straddle bytes: each tensor's codes take ceil(3 n / 8) bytes."""
    rep = export_model(tiny_student("gpt2", 3), tmp_path / "e")
    assert rep.files == {WEIGHTS: os.path.getsize(tmp_path / "e" / WEIGHTS)} and rep.format == "qgplm"
    shapes = [e["shape"] for e in json.loads((tmp_path / "e" / MANIFEST).read_text())["packed"].values()]
    assert rep.quant_weights == sum(math.prod(s) for s in shapes)
    assert rep.codes_bytes == sum(math.ceil(3 * math.prod(s) / 8) for s in shapes)
    assert rep.quant_bits_per_weight == 8 * (rep.codes_bytes + 4 * len(shapes)) / rep.quant_weights
