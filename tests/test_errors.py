"""Bad input and failures end in one clear error naming the fix, and nothing earlier is lost.

Unit checks of the model/tokenizer loaders first, then the table of user mistakes run
through the real command line, then failures injected in-process (NaN loss, negative gamma,
out of GPU memory, full or read-only disk).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from qgplm.errors import QgplmError
from qgplm.models import build_model, check_compatible, load_pretrained, load_tokenizer
from qgplm.train.config import ModelConfig, RunConfig
from qgplm.train.resume import read_identity
from tests.conftest import SHARED_DATA, TINY, run_cli


def _tiny(vocab=50):
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=vocab, n_positions=32))


def test_model_dir_without_config_or_weights(tmp_path):
    with pytest.raises(QgplmError, match="has no config.json"):
        load_pretrained(str(tmp_path))
    _tiny().config.save_pretrained(tmp_path)
    with pytest.raises(QgplmError, match="has no weights"):
        load_pretrained(str(tmp_path))


def test_saved_local_model_loads(tmp_path):
    m = _tiny()
    m.save_pretrained(tmp_path)
    loaded = load_pretrained(str(tmp_path))
    x = torch.randint(0, 50, (1, 8))
    assert torch.equal(loaded.eval()(x).logits, m.eval()(x).logits)


def test_tokenizer_dir_missing_files(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(QgplmError, match="tokenizer"):
        load_tokenizer(str(tmp_path))


def test_shared_gpt2_tokenizer_folder_loads():
    tok = load_tokenizer(str(SHARED_DATA / "gpt2-tokenizer"))
    assert len(tok) == 50257 and tok("Hello world")["input_ids"] == [15496, 995]


def test_teacher_vocab_smaller_than_tokenizer():
    tok = load_tokenizer(str(SHARED_DATA / "gpt2-tokenizer"))
    with pytest.raises(QgplmError, match="tokenizer has 50257 tokens but the model's embedding only 50"):
        check_compatible(_tiny(50), tok, 16)


def test_block_size_beyond_positions():
    tok = load_tokenizer(str(SHARED_DATA / "gpt2-tokenizer"))
    with pytest.raises(QgplmError, match="task.block_size=64 exceeds the model's 32 positions"):
        check_compatible(_tiny(50257), tok, 64)


def test_unknown_arch_for_random_init():
    tok = load_tokenizer(str(SHARED_DATA / "gpt2-tokenizer"))
    with pytest.raises(QgplmError, match="model.arch='nonsense'"):
        build_model(ModelConfig(name="x", arch="nonsense", config={"n_layer": 1}), tok, 16)


def test_nan_loss_stops_with_step_and_term(tiny_cfg):
    from qgplm.train.config import RunConfig
    from qgplm.train.module import TeacherModule

    run = RunConfig.from_hydra(tiny_cfg())
    module = TeacherModule(_tiny(50), run.teacher.optim, 1)
    module.log = lambda *a, **k: None
    with torch.no_grad():
        module.model.lm_head.weight.fill_(float("nan"))
    x = torch.randint(0, 50, (2, 8))
    with pytest.raises(QgplmError,
                       match=r"non-finite loss at step 0 in the ce term \(ce=nan\): lower teacher.optim.lr"):
        module.training_step({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}, 0)


# ====================================================================== the user's mistakes
# Every case goes through the real command line (`python -m qgplm.run ...`, offline) and must end
# with exit code 2, exactly one `error:` line on stderr that names the fix, no traceback, and every
# file of the earlier runs (teacher run, student run, an existing run dir, a sweep) untouched.


W2 = "bits.weight=2 bits.embedding=2 bits.activation=8"

# (id, extra args with {placeholders} from the `world` fixture, substrings of the error line,
#  whether the TINY sizes are prepended)
CASES = [
    # ---- config groups and values
    ("unknown-model", ["model=nope"],
     ["model=nope is not an option: choose one of bart, causal_lm, gpt2, seq2seq_lm, smollm2, tiny_bart, "
      "tiny_gpt2"], True),
    ("unknown-task", ["task=nope"],
     ["task=nope is not an option: choose one of builtin, cnndm, personachat, ptb, wikitext103, wikitext2, xsum"],
     True),
    ("unknown-method", ["method=nope"], ["method=nope is not an option: choose one of", "quantgpt", "twn"], True),
    ("unknown-bits", ["bits=3"], ["bits=3 is not an option: choose one of 2, 4, 8, fp", "bits.weight"], True),
    ("non-integer-bits-group", ["bits=two"], ["bits=two is not an option"], True),
    ("bits-above-8", ["bits.weight=9"], ["bits.weight must be an integer in 1..8 or null"], True),
    ("bits-zero", ["bits.embedding=0"], ["bits.embedding must be an integer in 1..8 or null"], True),
    ("bits-not-integer", ["bits.activation=3.5"], ["bits.activation must be an integer"], True),
    ("bits-not-a-number", ["bits.weight=abc"], ["bits.weight must be an integer"], True),
    ("weight-bits-method-cannot-do", ["method=twn", "bits=4"],
     ["method twn (quantizer twn) cannot quantize weights to 4 bits: use bits.weight in 2"], True),
    ("activation-bits-method-cannot-do", ["method.activation_symmetric=true", "bits.activation=1"],
     ["symmetric activation quantization needs bits.activation >= 2"], True),
    ("unknown-key", ["foo=1"], ["unknown config key foo", "+foo=1"], True),
    ("unknown-nested-key", ["+method.distill.tua=0.2"], ["unknown config key method.distill.tua"], True),
    ("unknown-quantizer-option", ["+method.quantizer_kwargs.gamma_int=mse"],
     ["method.quantizer_kwargs.gamma_int is not an option of quantizer quantgpt: choose from", "gamma_init"], True),
    ("bad-quantizer-option-value", ["method=quantgpt_full_grid", "method.quantizer_kwargs.grid=asym"],
     ["method.quantizer_kwargs of quantizer quantgpt: grid must be 'symmetric' or 'full', got 'asym'",
      "conf/method/quantgpt_full_grid.yaml"], True),
    ("quantizer-path-not-importable", ["method.quantizer=my_pkg.quant.MyQuantizer"],
     ["method.quantizer=my_pkg.quant.MyQuantizer: cannot import my_pkg.quant", "PYTHONPATH"], True),
    ("unparsable-override", ["bits=["], ["cannot parse the command line", "key=value"], True),
    ("unknown-stage", ["stage=train"], ["stage='train' is not valid: choose one of teacher, quantize, pipeline"], True),
    # ---- a config group given something other than an option name (crashed inside Hydra)
    ("bits-group-float", ["bits=3.5"], ["bits=3.5 is not an option: choose one of 2, 4, 8, fp", "bits.weight"], True),
    ("bits-group-float-integral", ["bits=2.0"], ["bits=2.0 is not an option: choose one of 2, 4, 8, fp"], True),
    ("model-group-number", ["model=1"], ["model=1 is not an option: choose one of bart, causal_lm, gpt2"], True),
    ("bits-group-list", ["bits=[2,4]"], ["bits=[2,4] is not an option", "not a list", "-m bits=2,4"], True),
    ("group-null", ["task=null"], ["task=null is not an option: choose one of builtin", "leave task out"], True),
    ("group-mapping", ["trainer={{a:1}}"], ["trainer={a:1} is not an option: choose one of cpu, ddp"], True),
    ("group-sweep-with-a-number", ["-m", "bits=fp,2.0"], ["bits=2.0 is not an option: choose one of 2, 4, 8, fp"],
     True),
    ("group-choice-of-numbers", ["-m", "bits=choice(2,4)"], ["is not a sweep of options", "-m bits=2,4"], True),
    # ---- numbers outside their range (trained without a word, or crashed in Lightning)
    ("weight-decay-negative", ["teacher.optim.weight_decay=-0.1"],
     ["teacher.optim.weight_decay must be >= 0, got -0.1: set teacher.optim.weight_decay to a number >= 0"], True),
    ("scale-lr-zero", ["student.optim.scale_lr=0"], ["student.optim.scale_lr must be a positive number"], True),
    ("lr-infinite", ["student.optim.lr=inf"], ["student.optim.lr must be a positive number, got inf"], True),
    ("warmup-steps-negative", ["student.optim.warmup_steps=-5"], ["student.optim.warmup_steps must be >= 0"], True),
    ("adam-beta-out-of-range", ["+teacher.optim.betas=[0.9,1.5]"],
     ["teacher.optim.betas must be two numbers in [0, 1)", "teacher.optim.betas=[0.9,0.999]"], True),
    ("scale-warmup-negative", ["method.warmup.ramp_steps=-1"], ["method.warmup.ramp_steps must be >= 0"], True),
    ("all-loss-weights-zero", ["method.distill.kd_weight=0", "method.distill.contrastive_weight=0"],
     ["are all 0, so the student would learn nothing", "method.distill.kd_weight=1.0"], True),
    ("seed-negative", ["seed=-1"], ["seed must be an integer in 0..4294967295, got -1"], True),
    ("cpu-allocator-unknown", ["cpu_allocator=jemalloc"],
     ["cpu_allocator='jemalloc' is not valid: choose one of reuse, system"], True),
    ("num-workers-negative", ["task.num_workers=-1"], ["task.num_workers must be >= 0"], True),
    ("max-train-tokens-zero", ["task.max_train_tokens=0"], ["task.max_train_tokens must be >= 1 or null"], True),
    ("generate-samples-negative", ["generate_samples=-2"], ["generate_samples must be >= 0"], True),
    ("accumulate-grad-batches-zero", ["trainer.accumulate_grad_batches=0"],
     ["trainer.accumulate_grad_batches must be an integer >= 1, got 0"], True),
    ("gradient-clip-negative", ["trainer.gradient_clip_val=-1"], ["trainer.gradient_clip_val must be >= 0 or null"],
     True),
    ("precision-unknown", ["trainer.precision=bogus"], ["trainer.precision='bogus' is not valid: choose one of"], True),
    # ---- indices into the model, checked before anything trains (crashed after the teacher trained)
    ("distill-layer-beyond-the-model", ["method.distill.layer=5"],
     ["method.distill.layer=5 is beyond the model's 1 layers", "index in -2..1"], True),
    ("distill-layer-beyond-the-teacher", ["stage=quantize", "teacher_path={teacher_run}", "method.distill.layer=-3"],
     ["method.distill.layer=-3 is beyond the model's 1 layers"], True),
    ("generation-longer-than-positions", ["model=tiny_bart", "task=xsum", "task.generation.max_length=4000"],
     ["task.generation.max_length=4000 exceeds the model's", "set task.generation.max_length<="], False),
    ("samples-longer-than-positions", ["model.config.n_positions=20", "task.block_size=16"],
     ["generate_samples=1 needs 28 positions", "set generate_samples=0"], True),
    # ---- teacher
    ("quantize-without-teacher", ["stage=quantize"], ["stage=quantize needs a teacher: pass teacher_path="], True),
    ("teacher-path-missing", ["stage=quantize", "teacher_path={tmp}/nowhere"], ["does not exist"], True),
    ("teacher-path-is-a-ckpt-file", ["stage=quantize", "teacher_path={teacher_ckpt}"],
     ["is a file: pass the run dir"], True),
    ("teacher-path-is-a-quantize-run", ["stage=quantize", "teacher_path={student_run}"],
     ["without a saved teacher/", "stage=teacher or pipeline"], True),
    ("teacher-vocab-smaller-than-tokenizer", ["stage=quantize", "teacher_path={gpt2_tok_teacher}"],
     ["tokenizer has 50257 tokens but the model's embedding only", "matching checkpoint"], True),
    ("teacher-tokenizer-does-not-fit-data", ["stage=quantize", "teacher_path={teacher_run}", "task=wikitext2",
                                             "task.data_dir={data}/small"],
     ["tokens are unknown (<unk>) to the tokenizer", "use a teacher trained on task=wikitext2"], True),
    ("teacher-arch-wrong-kind", ["stage=quantize", "teacher_path={teacher_run}", "model.kind=seq2seq"],
     ["task=builtin needs a causal model but model=tiny_gpt2 has model.kind=seq2seq",
      "use model=tiny_gpt2, gpt2 or causal_lm (or model.kind=causal"], True),
    ("teacher-too-few-positions", ["stage=quantize", "teacher_path={teacher_run}", "task.block_size=128"],
     ["task.block_size=128 exceeds the model's 64 positions: set task.block_size<=64"], True),
    ("teacher-weights-truncated", ["stage=quantize", "teacher_path={trunc_teacher}"],
     ["are truncated or corrupt", "save the model again"], True),
    # ---- models and tokenizers
    ("hub-model-offline", ["model=gpt2", "task=wikitext2", "task.data_dir={data}/small", "logger=none"],
     ["hub is unreachable", "model.name_or_path=<local dir", "model=tiny_gpt2"], False),
    ("hub-dataset-offline", ["task=wikitext2"], ["hub is unreachable", "task.data_dir="], True),
    ("model-dir-without-config", ["model=gpt2", "model.name_or_path={tmp}/empty_model",
                                  "model.tokenizer={shared}/gpt2-tokenizer", "task=wikitext2",
                                  "task.data_dir={data}/small", "task.block_size=32", "logger=none"],
     ["has no config.json: pass a folder written by save_pretrained"], False),
    ("model-dir-without-weights", ["model=gpt2", "model.name_or_path={tmp}/config_only_model",
                                   "model.tokenizer={shared}/gpt2-tokenizer", "task=wikitext2",
                                   "task.data_dir={data}/small", "task.block_size=32", "logger=none"],
     ["has no weights", "save_pretrained"], False),
    ("tokenizer-dir-missing-files", ["task=wikitext2", "task.data_dir={data}/small", "model.tokenizer={tmp}/bad_tok"],
     ["cannot load a tokenizer from", "tokenizer.json or vocab.json + merges.txt"], True),
    # ---- data
    ("data-dir-missing", ["task=wikitext2", "task.data_dir={tmp}/no_data"], ["is not a directory: point it at"], True),
    ("split-file-missing", ["task=wikitext2", "task.data_dir={data}/no_test"],
     ["missing test file", "task.files.test=<file name>"], True),
    ("split-empty", ["task=wikitext2", "task.data_dir={data}/empty"], ["the valid file", "is empty"], True),
    ("split-shorter-than-a-block", ["task=wikitext2", "task.data_dir={data}/short"],
     ["test split has", "fewer than one block (task.block_size=32)", "lower task.block_size"], True),
    ("data-not-utf8", ["task=wikitext2", "task.data_dir={data}/binary"], ["is not UTF-8 text", "iconv -t UTF-8"], True),
    ("jsonl-line-not-json", ["model=tiny_bart", "task=xsum", "task.data_dir={data}/jsonl_not_json"],
     ["sample.jsonl:31 is not valid JSON", "one object per line is expected"], False),
    ("jsonl-line-without-summary", ["model=tiny_bart", "task=xsum", "task.data_dir={data}/jsonl_no_summary"],
     ["sample.jsonl:31 needs the keys document and summary"], False),
    ("personachat-turn-without-gold", ["task=personachat", "task.data_dir={data}/persona_no_gold"],
     ["train[5] needs personality and utterances[].history/.candidates"], False),
    # ---- checkpoints
    ("ckpt-truncated", ["stage=quantize", "teacher_path={teacher_run}", "ckpt_path={trunc_ckpt}"],
     ["cannot be read", "it is truncated or corrupt", "resume from another checkpoint"], True),
    ("ckpt-other-method", ["stage=quantize", "teacher_path={teacher_run}", "ckpt_path={student_ckpt}", "method=pact"],
     ["is from a run with method=quantgpt quantizer=quantgpt, this run has method=pact quantizer=pact",
      "resume with method=quantgpt"], True),
    ("ckpt-other-bits", ["stage=quantize", "teacher_path={teacher_run}", "ckpt_path={student_ckpt}", "bits=4"],
     ["is from a run with bits=W2E2A8, this run has bits=W4E4A8", f"resume with {W2}"], True),
    ("ckpt-of-the-teacher", ["stage=quantize", "teacher_path={teacher_run}", "ckpt_path={teacher_ckpt}"],
     ["is of the teacher stage, which stage=quantize does not run: use stage=teacher or stage=pipeline"], True),
    ("ckpt-of-a-finished-run", ["stage=pipeline", "ckpt_path={student_ckpt}"],
     ["already finished (metrics.json exists): nothing to resume"], True),
    # ---- training
    ("nan-from-huge-lr", ["stage=quantize", "teacher_path={teacher_run}", "student.optim.lr=1e30",
                          "student.eval_every=1"], ["at step 1", "lower student.optim.lr (now 1e+30)"], True),
    # ---- output
    ("run-dir-holds-a-run", ["hydra.run.dir={existing_run}"],
     ["already holds a run (metrics.json)", "new hydra.run.dir"], True),
    ("sweep-dir-holds-runs", ["-m", "bits=2,4", "hydra.sweep.dir={existing_sweep}"],
     ["hydra.sweep.dir=", "already holds runs (0/)", "new hydra.sweep.dir"], True),
    ("run-dir-under-a-file", ["hydra.run.dir={tmp}/a_file/run"],
     ["cannot write to hydra.run.dir=", "Not a directory", "choose a writable directory"], True),
    ("run-dir-read-only", ["hydra.run.dir={read_only}/run"], ["cannot write to hydra.run.dir=", "writable"], True),
]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _write_data(dst: Path, lines: int = 400) -> None:
    dst.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        src = SHARED_DATA / "wikitext-2" / f"wiki.{split}.tokens"
        with src.open(encoding="utf-8") as f:
            head = [next(f) for _ in range(lines)]
        (dst / f"wiki.{split}.tokens").write_text("".join(head), encoding="utf-8")


def _broken_models(tmp: Path, w: dict) -> None:
    """Cut weight files and checkpoints, a tokenizer that does not fit, folders missing files."""
    # a teacher whose weights file is cut in half, and a cut student checkpoint
    shutil.copytree(tmp / "teacher_run" / "teacher", tmp / "trunc_teacher")
    weights = tmp / "trunc_teacher" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    w["trunc_teacher"] = str(tmp / "trunc_teacher")
    data = Path(w["student_ckpt"]).read_bytes()
    (tmp / "trunc.ckpt").write_bytes(data[: len(data) // 2])
    w["trunc_ckpt"] = str(tmp / "trunc.ckpt")
    # the teacher's model with GPT-2's 50257-token tokenizer beside it
    gpt2_tok = tmp / "gpt2_tok_teacher"
    shutil.copytree(tmp / "teacher_run" / "teacher", gpt2_tok)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (gpt2_tok / f).unlink()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(SHARED_DATA / "gpt2-tokenizer" / f, gpt2_tok / f)
    w["gpt2_tok_teacher"] = str(gpt2_tok)
    # model and tokenizer folders missing files
    (tmp / "empty_model").mkdir()
    (tmp / "config_only_model").mkdir()
    _tiny().config.save_pretrained(tmp / "config_only_model")
    (tmp / "bad_tok").mkdir()
    (tmp / "bad_tok" / "vocab.json").write_text("{}")


def _bad_data_dirs(d: Path) -> None:
    """Data folders: small and good, then one defect each."""
    _write_data(d / "small")
    for name in ("no_test", "empty", "short", "binary"):
        shutil.copytree(d / "small", d / name)
    (d / "no_test" / "wiki.test.tokens").unlink()
    (d / "empty" / "wiki.valid.tokens").write_text("")
    (d / "short" / "wiki.test.tokens").write_text(" a few words \n")
    with (d / "binary" / "wiki.train.tokens").open("ab") as f:
        f.write(b"caf\xe9 latin-1 bytes\n")
    # summarization JSON lines with a broken line / a line without `summary`
    good = '{"id": "%d", "document": "a short article about the weather .", "summary": "weather ."}\n'
    for name, bad in (("jsonl_not_json", '{"id": "x", "document": "cut off'),
                      ("jsonl_no_summary", '{"id": "x", "document": "no summary"}')):
        (d / name).mkdir()
        (d / name / "sample.jsonl").write_text("".join(good % i for i in range(30)) + bad + "\n")
    # Persona-Chat (ConvAI2 JSON) with a turn that has no candidates, so no gold reply
    dialog = {"personality": ["i like tea ."], "utterances": [{"history": ["hi"], "candidates": ["hello", "hey"]}]}
    broken = {"personality": ["i like tea ."], "utterances": [{"history": ["hi"], "candidates": []}]}
    (d / "persona_no_gold").mkdir()
    (d / "persona_no_gold" / "personachat_self_original.json").write_text(
        json.dumps({"train": [dialog] * 5 + [broken], "valid": [dialog] * 3}))


def _earlier_runs(tmp: Path, w: dict) -> tuple[Path, Path]:
    """An earlier run dir and an earlier sweep, a regular file, a read-only dir."""
    existing = tmp / "existing_run"
    (existing / ".hydra").mkdir(parents=True)
    (existing / ".hydra" / "config.yaml").write_text("earlier: config\n")
    (existing / "metrics.json").write_text('{"earlier": true}\n')
    w["existing_run"] = str(existing)
    sweep = tmp / "existing_sweep"
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "0" / ".hydra" / "config.yaml").write_text("earlier: job 0\n")
    (sweep / "0" / "metrics.json").write_text('{"earlier": 0}\n')
    w["existing_sweep"] = str(sweep)
    (tmp / "a_file").write_text("not a directory\n")
    ro = tmp / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    w["read_only"] = str(ro)
    return existing, sweep


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Earlier results (a teacher run, a student run, an existing run dir and sweep) and bad inputs."""
    tmp = tmp_path_factory.mktemp("world")
    w = {"tmp": str(tmp), "shared": str(SHARED_DATA), "data": str(tmp / "data")}
    proc = run_cli([*TINY, "stage=teacher", f"hydra.run.dir={tmp / 'teacher_run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli([*TINY, "stage=quantize", f"teacher_path={tmp / 'teacher_run'}",
                    f"hydra.run.dir={tmp / 'student_run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    w["teacher_run"], w["student_run"] = str(tmp / "teacher_run"), str(tmp / "student_run")
    w["teacher_ckpt"] = str(tmp / "teacher_run" / "checkpoints" / "teacher" / "last.ckpt")
    w["student_ckpt"] = str(tmp / "student_run" / "checkpoints" / "student" / "last.ckpt")
    _broken_models(tmp, w)
    _bad_data_dirs(tmp / "data")
    existing, sweep = _earlier_runs(tmp, w)
    w["_protected"] = [tmp / "teacher_run", tmp / "student_run", existing, sweep, tmp / "trunc_teacher"]
    yield w
    Path(w["read_only"]).chmod(0o755)


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert proc.stderr.count("error: ") == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("args, expected, tiny", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_mistake_ends_in_one_clear_line(world, tmp_path, args, expected, tiny):
    if "{read_only}" in " ".join(args) and os.access(world["read_only"], os.W_OK):
        pytest.skip("running as root: chmod does not block writes (run-dir-under-a-file covers an unwritable dir)")
    before = {str(p): _tree_digest(p) for p in world["_protected"]}
    args = [a.format(**world) for a in args]
    if not any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in args):
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    flags = [a for a in args if a.startswith("-")]  # -m must precede the overrides
    err = _one_error_line(run_cli([*flags, *(TINY if tiny else []), *[a for a in args if a not in flags]]))
    for text in expected:
        assert text in err, err
    assert {str(p): _tree_digest(p) for p in world["_protected"]} == before, "an earlier run was modified"
    assert not (tmp_path / "run" / "metrics.json").exists()


def _run(cfg):
    from qgplm.train.pipeline import run_stages

    run = RunConfig.from_hydra(cfg)
    return run_stages(run, cfg.trainer, cfg.get("logger"), cfg.get("callbacks"))


def test_nan_loss_keeps_the_last_good_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    """kd turns NaN at the 4th student step: the error names step and term, and last.ckpt of the
    eval at step 2 stays on disk, finite, loadable and resumable."""
    import qgplm.train.module as module

    real, calls = module.soft_cross_entropy, {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] > 3 else out

    monkeypatch.setattr(module, "soft_cross_entropy", poisoned)
    with pytest.raises(QgplmError) as e:
        _run(tiny_cfg("student.max_steps=6", "student.eval_every=2"))
    last = tmp_path / "checkpoints" / "student" / "last.ckpt"
    msg = str(e.value)
    assert "non-finite loss at step 3 in the kd term (kd=nan" in msg and "lower student.optim.lr" in msg
    assert f"the last good checkpoint is kept: {last}" in msg
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert read_identity(last)["stage"] == "student"
    assert not (tmp_path / "metrics.json").exists()


def test_negative_gamma_is_clamped_and_warned_once(tiny_cfg, tmp_path):
    """A scale LR so high that gamma goes <= 0: clamped positive, one warning, the run finishes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = _run(tiny_cfg("student.optim.scale_lr=1000", "student.optim.warmup_steps=0", "stage=pipeline",
                                "generate_samples=0"))
    clamps = [w for w in caught if "quantizer scale went to <= 0" in str(w.message)]
    assert len(clamps) == 1 and "student.optim.scale_lr" in str(clamps[0].message)
    assert metrics["student"]["test_ppl"] > 0
    ckpt = torch.load(tmp_path / "checkpoints" / "student" / "last.ckpt", weights_only=True)
    gammas = [v for k, v in ckpt["state_dict"].items() if k.endswith(".gamma")]
    assert gammas and all((g > 0).all() for g in gammas)


@pytest.mark.parametrize("hook, key", [("training_step", "task.batch_size=4: lower it, e.g. task.batch_size=2"),
                                       ("test_step", "task.eval_batch_size=8: lower it, e.g. task.eval_batch_size=4")])
def test_out_of_gpu_memory_names_the_batch_size(tiny_cfg, monkeypatch, hook, key):
    from qgplm.train.module import TeacherModule

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(TeacherModule, hook, oom)
    with pytest.raises(QgplmError, match=f"out of GPU memory with {key}"):
        _run(tiny_cfg("stage=teacher", "generate_samples=0"))


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_is_one_line_and_leaves_no_partial_file(tiny_cfg, tmp_path, monkeypatch, capsys, err):
    from qgplm.cli.run import execute

    def no_space(src, dst):
        raise OSError(err, os.strerror(err), str(dst))

    (tmp_path / "notes.txt").write_text("earlier file\n")
    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(SystemExit) as e:
        execute(tiny_cfg("stage=teacher", "trainer.fast_dev_run=true", "generate_samples=0"))
    assert e.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    # the first atomic write after the teacher is saved: its figures (teacher_metrics.json)
    first = tmp_path / "teacher_metrics.json"
    assert len(lines) == 1 and f"cannot write {first} ({os.strerror(err)})" in lines[0]
    assert ("free disk space" if err == errno.ENOSPC else "hydra.run.dir=<a writable dir>") in lines[0]
    assert not first.exists() and not list(tmp_path.glob(".teacher_metrics.json.*"))
    assert not (tmp_path / "metrics.json").exists()
    assert (tmp_path / "notes.txt").read_text() == "earlier file\n"
    assert (tmp_path / "teacher" / "config.json").is_file()  # what was written before the failure stays


def test_reliability_case_count():
    """docs/errors.md (the reliability page) quotes the size of the CLI table."""
    errors_doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    assert f"{len(CASES)} user mistakes" in errors_doc
