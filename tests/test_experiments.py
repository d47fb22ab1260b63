"""The comparison harness: BPE tokenizer option, the table/plot script on real run outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qgplm.data.bpe import train_bpe_tokenizer
from tests.conftest import ROOT, SHARED_DATA


def test_bpe_tokenizer_trained_on_the_train_split_round_trips(tmp_path):
    text = (SHARED_DATA / "wikitext-2" / "wiki.valid.tokens").read_text()
    tok = train_bpe_tokenizer(text, 600)
    assert len(tok) == 600
    sample = " The game 's first season , 2010 .\n"
    ids = tok(sample)["input_ids"]
    assert tok.decode(ids) == sample  # byte-level: lossless
    tok.save_pretrained(tmp_path)
    from qgplm.models import load_tokenizer

    assert load_tokenizer(str(tmp_path))(sample)["input_ids"] == ids


def _metrics(method, bits, ppl, stage="quantize", negatives="teacher"):
    return {"config": {"stage": stage, "model": "m", "task": "t", "method": method, "bits": f"W{bits}E{bits}A8",
                       "negatives": negatives},
            "teacher": {"test_ppl": 10.0}, "student": {"test_ppl": ppl},
            "size": {"fp32_mib": 20.0, "quantized_mib": 20.0 * bits / 32, "compression": 32 / bits},
            "wall_time_s": {"student": 5.0}}


def test_table_script_builds_main_and_ablation_tables(tmp_path):
    (tmp_path / "teacher").mkdir()
    teacher = _metrics("quantgpt", 32, 0, stage="teacher")
    del teacher["student"]
    (tmp_path / "teacher" / "metrics.json").write_text(json.dumps(teacher))
    runs = [("quantgpt", 2, 12.0, "teacher"), ("pact", 2, 40.0, "teacher"), ("quantgpt", 4, 10.5, "teacher"),
            ("quantgpt_no_contrastive", 2, 13.0, "teacher"), ("quantgpt", 2, 12.5, "student")]
    for i, (method, bits, ppl, neg) in enumerate(runs):
        d = tmp_path / "sweep" / str(i)
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(_metrics(method, bits, ppl, negatives=neg)))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "table.py"), str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    main, ablations = proc.stdout.split("## Ablations")
    assert "| quantgpt | 2-2-8 | 1.25 | 16.0x | 12.00 | 1.200 |" in main
    assert "| pact | 2-2-8 |" in main and "no_contrastive" not in main and "negatives=student" not in main
    assert main.index("| quantgpt | 4-4-8") < main.index("| quantgpt | 2-2-8")  # higher bits first
    assert "| quantgpt_no_contrastive | 2-2-8 |" in ablations and "| quantgpt (negatives=student) |" in ablations
    assert (tmp_path / "table.md").is_file() and (tmp_path / "ppl_vs_bits.png").stat().st_size > 1000


@pytest.mark.slow
def test_compare_harness_end_to_end_tiny(tmp_path):
    """compare.py: teacher once, a 2-method multirun from it, the table; tiny sizes."""
    from tests.conftest import TINY

    tiny = [o for o in TINY if not o.startswith(("logger", "generate_samples"))]
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "compare.py"), "--experiment", "wt2_small",
                           "--methods", "quantgpt,minmax", "--results", str(tmp_path), *tiny,
                           "task.bpe_vocab_size=500", "logger=none"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| quantgpt | 2-2-8 |" in proc.stdout and "| minmax | 2-2-8 |" in proc.stdout
    assert (tmp_path / "wt2_small" / "teacher" / "teacher" / "config.json").is_file()
