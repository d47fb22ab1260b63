"""The comparison harness: BPE tokenizer option, the table/plot script on real run outputs."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

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


def _metrics(method, bits, ppl, stage="quantize", negatives="teacher", task="t"):
    return {"config": {"stage": stage, "model": "m", "task": task, "method": method, "bits": f"W{bits}E{bits}A8",
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
    # a run with a method override Hydra recorded (a lambda sweep): its own row, not a seed of quantgpt
    d = tmp_path / "lambda" / "0"
    (d / ".hydra").mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(_metrics("quantgpt", 2, 20.0)))
    (d / ".hydra" / "overrides.yaml").write_text("- experiment=wt2_small\n- method=quantgpt\n"
                                                 "- method.distill.contrastive_weight=0.5\n- seed=1\n")
    # a W4 variant (per-token activations): an ablation row too, never averaged into lsq's main row
    for i, (method, ppl, override) in enumerate((("lsq", 11.0, None), ("lsq", 10.2, "activation_granularity=token"))):
        d = tmp_path / "w4" / str(i)
        (d / ".hydra").mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(_metrics(method, 4, ppl)))
        (d / ".hydra" / "overrides.yaml").write_text(f"- method={method}\n" + (f"- method.{override}\n" if override
                                                                                else ""))
    # the same method under bf16 autocast (trainer.precision on the command line): its own row too
    d = tmp_path / "bf16" / "0"
    (d / ".hydra").mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(_metrics("pact", 2, 41.0)))
    (d / ".hydra" / "overrides.yaml").write_text("- method=pact\n- trainer.precision=bf16-mixed\n")
    d = tmp_path / "bf16" / "1"  # and at another scale learning rate
    (d / ".hydra").mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(_metrics("pact", 2, 42.0)))
    (d / ".hydra" / "overrides.yaml").write_text("- method=pact\n- trainer.precision=bf16-mixed\n"
                                                 "- student.optim.scale_lr=0.01\n- seed=1\n")
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "table.py"), str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    main, ablations = proc.stdout.split("## Ablations")
    assert "| pact | 2-2-8 | 1.25 | 16.0x | 40.00 |" in main and "bf16" not in main
    assert "| pact (precision=bf16-mixed) | 2-2-8 | 1.25 | 16.0x | 41.00 |" in ablations
    assert "| pact (optim.scale_lr=0.01, precision=bf16-mixed) | 2-2-8 | 1.25 | 16.0x | 42.00 |" in ablations
    assert "| lsq | 4-4-8 | 2.50 | 8.0x | 11.00 |" in main and "activation_granularity" not in main
    assert "| lsq (activation_granularity=token) | 4-4-8 | 2.50 | 8.0x | 10.20 |" in ablations
    assert "| quantgpt (contrastive_weight=0.5) | 2-2-8 | 1.25 | 16.0x | 20.00 |" in ablations
    assert "contrastive_weight" not in main
    assert "| quantgpt | 2-2-8 | 1.25 | 16.0x | 12.00 | 1.200 |" in main
    assert "| pact | 2-2-8 |" in main and "no_contrastive" not in main and "negatives=student" not in main
    assert main.index("| quantgpt | 4-4-8") < main.index("| quantgpt | 2-2-8")  # higher bits first
    assert "| quantgpt_no_contrastive | 2-2-8 |" in ablations and "| quantgpt (negatives=student) |" in ablations
    assert (tmp_path / "table.md").is_file() and (tmp_path / "ppl_vs_bits.png").stat().st_size > 1000


def _write_task(root, task, teacher_ppl, runs):
    (root / "teacher").mkdir(parents=True)
    teacher = _metrics("quantgpt", 32, 0, stage="teacher", task=task)
    teacher["teacher"]["test_ppl"] = teacher_ppl
    del teacher["student"]
    (root / "teacher" / "metrics.json").write_text(json.dumps(teacher))
    for i, (method, bits, ppl) in enumerate(runs):
        d = root / "sweep" / str(i)
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(_metrics(method, bits, ppl, task=task)))


def test_table_aggregates_seeds_and_puts_tasks_side_by_side(tmp_path):
    # wikitext2: quantgpt at three seeds (mean 12, sample std 1), lsq once; ptb: both once, no W4 run
    _write_task(tmp_path / "a", "wikitext2", 10.0,
                [("quantgpt", 2, 11.0), ("quantgpt", 2, 12.0), ("quantgpt", 2, 13.0), ("lsq", 2, 15.0),
                 ("lsq", 4, 10.5)])
    _write_task(tmp_path / "b", "ptb", 20.0, [("quantgpt", 2, 30.0), ("lsq", 2, 25.0)])
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "table.py"), str(tmp_path / "a"),
                           str(tmp_path / "b"), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    main = proc.stdout.split("## Ablations")[0]
    assert ("| method | bits (W-E-A) | size (MiB) | compression | wikitext2 PPL | wikitext2 PPL / teacher | ptb PPL |"
            in main)
    assert "| teacher (FP32) | 32-32-32 | 20.00 | 1.0x | 10.00 | 1.000 | 20.00 | 1.000 | - |" in main
    assert "| quantgpt | 2-2-8 | 1.25 | 16.0x | 12.00 ± 1.00 (3 seeds) | 1.200 | 30.00 | 1.500 | 5 |" in main
    assert "| lsq | 4-4-8 | 2.50 | 8.0x | 10.50 | 1.050 | - | - | 5 |" in main
    assert main.index("| quantgpt | 2-2-8") < main.index("| lsq | 2-2-8")  # sorted by the first task's PPL
    assert (tmp_path / "out" / "table.md").is_file() and (tmp_path / "out" / "ppl_vs_bits.png").is_file()


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
    # a second seed of one method: its own sweep from the same teacher, aggregated in the table
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "compare.py"), "--experiment", "wt2_small",
                           "--methods", "quantgpt", "--seeds", "7", "--results", str(tmp_path), *tiny,
                           "task.bpe_vocab_size=500", "logger=none"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage=teacher" not in proc.stdout  # teacher reused
    assert (tmp_path / "wt2_small" / "methods_w2_quantgpt_seeds7" / "0" / "metrics.json").is_file()
    assert "(2 seeds)" in proc.stdout
    # the homogeneity investigation reads the same run dirs: the teacher and the three students
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "homogeneity.py"), str(tmp_path / "wt2_small"),
                           "--windows", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.split("| model | bits | homogeneity | test PPL |")[1]
    assert "| teacher (FP32) | - | 0." in table and "| quantgpt seed 7 | W2E2A8 | 0." in table and "| minmax |" in table


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_config_composes_and_validates(name, tmp_path):
    from hydra import compose, initialize_config_dir

    from qgplm.train.config import RunConfig

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        run = RunConfig.from_hydra(compose(config_name="run", overrides=[f"experiment={name}",
                                                                         f"paths.output_dir={tmp_path}"]))
    if name == "ptb_small":  # the wt2_small recipe on PTB's offline files
        assert run.task.name == "ptb" and run.task.bpe_vocab_size == 8192 and run.model.name == "gpt2_4x256"
        assert (SHARED_DATA / "ptb" / "ptb.train.txt").is_file() and run.task.data_dir.endswith("ptb")


def test_compare_skips_bit_widths_a_method_cannot_take(capsys):
    """TWN is 2-bit only: a W4/W8 sweep of all methods leaves it out instead of aborting at its job."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from compare import METHODS, method_sweeps

    assert method_sweeps(METHODS, "4,8", None, True) == [
        ("methods_w4-8", ["method=quantgpt,quantgpt_full_grid,pact,lsq,laq,minmax", "bits=4,8"])]
    assert "skip method=twn" in capsys.readouterr().out
    assert method_sweeps("twn,lsq", "2,4", "1", False) == [
        ("methods_w2_twn_seeds1", ["method=twn", "bits=2", "seed=1"]),
        ("methods_w2-4_lsq_seeds1", ["method=lsq", "bits=2,4", "seed=1"])]
    assert method_sweeps(METHODS, "2", None, True) == [("methods_w2", [f"method={METHODS}", "bits=2"])]


def test_compare_refuses_an_unknown_method_before_training_the_teacher(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "compare.py"), "--methods", "quantgpt,nope",
                           "--results", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --methods nope: no such method")
    assert "quantgpt_full_grid" in proc.stderr and not any(tmp_path.iterdir())  # no teacher started


def test_homogeneity_pieces(tmp_path):
    """token_homogeneity by hand (rows [1,0], [0,1], [2,0]: cosines 0, 1, 0 over the 3 distinct
    pairs -> 1/3), the windows cut from a text file, and the clear refusal of a too-short file."""
    import torch

    from qgplm.distill.metrics import token_homogeneity

    sys.path.insert(0, str(ROOT / "experiments"))
    from homogeneity import windows

    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]])
    assert token_homogeneity(hidden, torch.ones(1, 3)).item() == pytest.approx(1 / 3, abs=1e-7)
    tok = train_bpe_tokenizer((SHARED_DATA / "wikitext-2" / "wiki.valid.tokens").read_text()[:20000], 300)
    (tmp_path / "v.txt").write_text((SHARED_DATA / "wikitext-2" / "wiki.valid.tokens").read_text()[:20000])
    ids = windows(tok, tmp_path / "v.txt", 3, 16)
    assert ids.shape == (3, 16) and ids.dtype == torch.long
    (tmp_path / "short.txt").write_text("a b c")
    with pytest.raises(SystemExit, match="fewer than 3 windows of 16 tokens"):
        windows(tok, tmp_path / "short.txt", 3, 16)


def test_smollm2_rows_script_skips_done_rows_and_refuses_unknown_groups(tmp_path):
    """experiments/smollm2_rows.sh: a row whose metrics.json exists is not run again (resuming a
    long comparison across sessions); ONLY selects rows by path; an unknown group is one error line, exit 2."""
    script = ROOT / "experiments" / "smollm2_rows.sh"
    env = {**os.environ, "RESULTS": str(tmp_path)}
    bad = subprocess.run(["bash", str(script), "nope"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: unknown group nope")
    rows = ["teacher_as_is", "teacher", "w2/quantgpt", "w2/quantgpt_no_contrastive", "w2/lsq"]
    for row in rows:
        (tmp_path / "smollm2_wt2" / row).mkdir(parents=True)
        (tmp_path / "smollm2_wt2" / row / "metrics.json").write_text("{}")
    done = subprocess.run(["bash", str(script), "wt2_core"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [w for row in rows for w in ("done:", f"smollm2_wt2/{row}")]
    # ONLY keeps the rows whose path matches: the others are neither run nor reported
    only = subprocess.run(["bash", str(script), "wt2_core"], env={**env, "ONLY": "w2/lsq$"}, capture_output=True,
                          text=True)
    assert only.returncode == 0 and only.stdout.split() == ["done:", "smollm2_wt2/w2/lsq"], only.stderr


def test_ptq_error_sources_rows_on_a_tiny_llama(tmp_path):
    """experiments/ptq_error_sources.py: one row per quantized part, FP32 first, its ratio 1.00; bad input is
    one error line with exit code 2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    text = (SHARED_DATA / "wikitext-2" / "wiki.valid.tokens").read_text()[:20000]
    tok = train_bpe_tokenizer(text, 300)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "test.txt").write_text(text)
    script = str(ROOT / "experiments" / "ptq_error_sources.py")
    run = lambda *a: subprocess.run([sys.executable, script, *a], capture_output=True, text=True)  # noqa: E731
    proc = run(str(tmp_path / "m"), "--tokens", "300", "--data", str(tmp_path / "test.txt"),
               "--rows", "0,1,5,8,14,16,17")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r[0] for r in rows[1:]] == ["| FP32", "| A8 (per-tensor min-max, asymmetric)", "| W4E4",
                                        "| A8 (per-token min-max, asymmetric)", "| W4E4, one scale per output row",
                                        "| W4E4, gamma_init=fixed (3.0)", "| W4E4, lsq"]
    ppls = [float(r[1]) for r in rows[1:]]
    assert rows[1][2] == "1.00" and len(set(ppls)) == len(ppls)  # each row's extra fields reach the quantizer
    spec = importlib.util.spec_from_file_location("ptq_error_sources", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    past_the_end = str(len(mod.ROWS))
    for args, match in (((str(tmp_path),), "holds no HF model"),
                        ((str(tmp_path / "m"), "--rows", past_the_end), "--rows"),
                        ((str(tmp_path / "m"), "--tokens", "100"), "--tokens")):
        proc = run(*args, "--data", str(tmp_path / "test.txt"))
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
        assert match in proc.stderr
    # its scoring is the training runs' EvalWindows: one 128-token window is one forward's mean loss
    model = LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, len(tok), (128,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss
    assert mod.perplexity(model, ids) == pytest.approx(math.exp(float(loss)), rel=1e-5)
