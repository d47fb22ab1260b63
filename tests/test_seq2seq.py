"""BART (seq2seq) summarization and GPT-2 Persona-Chat, offline, on tiny sizes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from qgplm.cli.run import quote_int_group_overrides
from qgplm.errors import QgplmError
from qgplm.tasks.persona_chat import PersonaChatTaskConfig
from qgplm.tasks.summarization import SummarizationTaskConfig
from qgplm.train.config import RunConfig
from qgplm.train.pipeline import prepare_data, run_stages
from tests.conftest import CONF, ROOT, SHARED_DATA, run_cli

FIXTURE = ROOT / "tests" / "fixtures" / "personachat"

TINY_BART = [
    "model=tiny_bart", "task=xsum", "model.config.d_model=32", "model.config.encoder_layers=1",
    "model.config.decoder_layers=1", "model.config.encoder_attention_heads=2", "model.config.decoder_attention_heads=2",
    "model.config.encoder_ffn_dim=64", "model.config.decoder_ffn_dim=64", "model.config.max_position_embeddings=128",
    "task.max_train_examples=24", "task.max_eval_examples=4", "task.batch_size=4", "task.eval_batch_size=4",
    "task.max_source_length=96", "task.max_target_length=24", "task.generation.num_beams=2",
    "task.generation.max_length=16", "task.generation.min_length=2",
]
TINY_PERSONA = [
    "task=personachat", f"task.data_dir={FIXTURE}", "task.valid_size=1", "task.block_size=64",
    "model.config.n_layer=1", "model.config.n_embd=32", "model.config.n_head=2", "model.config.n_positions=64",
]
STEPS = ["teacher.max_steps=3", "teacher.eval_every=3", "student.max_steps=3", "student.eval_every=3",
         "logger=none", "generate_samples=2"]


def compose_run(overrides: list[str], out: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="run", overrides=quote_int_group_overrides(
            [f"paths.output_dir={out}", *STEPS, *overrides]))


def _run(cfg):
    run = RunConfig.from_hydra(cfg)
    return run, run_stages(run, cfg.trainer, cfg.get("logger"), cfg.get("callbacks"))


# ----------------------------------------------------------------------------- end to end
def test_tiny_bart_xsum_teacher_then_w2e2a8_student(tmp_path):
    t0 = time.time()
    # a 1k BPE trained on the slice (BART specials and framing) keeps the run short on 2 cores
    run, m = _run(compose_run([*TINY_BART, "bits=2", "method=quantgpt", "task.bpe_vocab_size=1000"], tmp_path))
    assert run.quant.tag == "W2E2A8" and run.task.kind == "summarization"
    assert m["teacher"]["params"] < 200_000
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for who in ("teacher", "student"):
        for key in ("test_ppl", "rouge1", "rouge2", "rougeL"):
            assert 0 <= on_disk[who][key] < float("inf"), (who, key)
        rows = [json.loads(line) for line in (tmp_path / f"summaries_{who}.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all({"id", "reference", "summary"} <= r.keys() for r in rows)
    assert on_disk["protocol"]["generation"]["num_beams"] == 2
    assert on_disk["protocol"]["examples"] == {"train": 24, "valid": 4, "test": 4}
    assert len(on_disk["summaries"]["student"]) == 2
    assert on_disk["size"]["compression"] > 1
    assert (tmp_path / "teacher" / "config.json").is_file()
    ckpt = torch.load(tmp_path / "checkpoints" / "student" / "last.ckpt", weights_only=True)
    assert ckpt["callbacks"]["MemoryBankCallback"]["bank"]["filled"].any()
    print(f"tiny BART xsum pipeline: {time.time() - t0:.1f} s")


def test_tiny_gpt2_personachat_teacher_then_w2e2a8_student(tmp_path):
    t0 = time.time()
    run, m = _run(compose_run([*TINY_PERSONA, "bits=2", "task.bpe_vocab_size=600"], tmp_path))
    assert run.task.kind == "next_utterance"
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for who in ("teacher", "student"):
        assert 0.0 <= on_disk[who]["accuracy"] <= 100.0 and on_disk[who]["test_ppl"] > 1
    # fixture: 2 valid dialogs x 3 turns are the test set, 5 candidates each
    assert on_disk["protocol"]["turns"] == {"train": 15, "valid": 3, "test": 6}
    assert on_disk["protocol"]["mean_candidates"]["test"] == 5
    print(f"tiny GPT-2 personachat pipeline: {time.time() - t0:.1f} s")


def test_local_bart_checkpoint_loads_by_name_or_path(tmp_path):
    """model=bart model.name_or_path=<dir>: a tiny BART saved with save_pretrained is loaded
    (and evaluated; teacher.max_steps=0 skips training)."""
    from transformers import BartConfig, BartForConditionalGeneration, BartTokenizerFast

    from qgplm.models import load_tokenizer

    tok = load_tokenizer(str(SHARED_DATA / "bart-tokenizer"), bare_bpe_class=BartTokenizerFast)
    cfg = BartConfig(vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=128)
    torch.manual_seed(0)
    saved = tmp_path / "my_bart"
    BartForConditionalGeneration(cfg).save_pretrained(saved)
    tok.save_pretrained(saved)
    overrides = [o for o in TINY_BART if not o.startswith(("model=", "model.config"))]
    run, m = _run(compose_run(["model=bart", f"model.name_or_path={saved}", *overrides, "stage=teacher",
                               "teacher.max_steps=0"], tmp_path / "run"))
    assert m["teacher"]["params"] == sum(p.numel() for p in BartForConditionalGeneration(cfg).parameters())
    assert "rouge1" in m["teacher"]


def test_model_bart_offline_fails_at_once_with_one_line():
    t0 = time.time()
    res = run_cli(["model=bart", "task=xsum"], timeout=120)
    assert res.returncode == 2
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "facebook/bart-base" in err[0] and "model.name_or_path=" in err[0]
    assert "Traceback" not in res.stderr
    assert time.time() - t0 < 90


# ----------------------------------------------------------------------------- config
def test_task_needs_matching_model_kind(tmp_path):
    with pytest.raises(QgplmError, match="task=xsum needs a seq2seq model.*tiny_bart"):
        RunConfig.from_hydra(compose_run(["task=xsum"], tmp_path))
    with pytest.raises(QgplmError, match="task=personachat needs a causal model"):
        RunConfig.from_hydra(compose_run(["task=personachat", "model=tiny_bart"], tmp_path))


@pytest.mark.parametrize("override,match", [
    ("task.rouge_keys=[rouge3]", "task.rouge_keys entry='rouge3' is not valid: choose one of rouge1"),
    ("task.generation.min_length=100", "task.generation.min_length must be in 0..max_length"),
    ("task.generation.num_beams=0", "task.generation.num_beams must be a positive number"),
    ("task.test_size=0", "task.test_size must be >= 1 or null"),
])
def test_bad_task_values_are_one_line_errors(tmp_path, override, match):
    with pytest.raises(QgplmError, match=match):
        RunConfig.from_hydra(compose_run([*TINY_BART, override], tmp_path))


# ----------------------------------------------------------------------------- data
def test_xsum_sample_split_is_deterministic_700_50_50(tmp_path):
    run = RunConfig.from_hydra(compose_run(["model=tiny_bart", "task=xsum"], tmp_path))
    _, dm = prepare_data(run)
    assert {k: len(v) for k, v in dm.examples.items()} == {"train": 700, "valid": 50, "test": 50}
    ids = {k: {e["id"] for e in v} for k, v in dm.examples.items()}
    assert not (ids["train"] & ids["test"]) and not (ids["valid"] & ids["test"])
    _, dm2 = prepare_data(run)
    assert [e["id"] for e in dm2.examples["test"]] == [e["id"] for e in dm.examples["test"]]
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"][:, 0].eq(0).all()  # <s> ... </s> BART encoding
    assert (batch["labels"] == -100).any() or batch["labels"].shape[1] <= run.task.max_target_length


def test_cnndm_stories_parse_highlights_as_lines(tmp_path):
    from qgplm.data.seq2seq import read_story

    run = RunConfig.from_hydra(compose_run(["model=tiny_bart", "task=cnndm"], tmp_path))
    _, dm = prepare_data(run)
    assert {k: len(v) for k, v in dm.examples.items()} == {"train": 16, "valid": 2, "test": 2}
    story = sorted((SHARED_DATA / "cnndm-sample").rglob("*.story"))[0]
    ex = read_story(story)
    assert "@highlight" not in ex["document"] and "@highlight" not in ex["summary"]
    assert len(ex["summary"].splitlines()) >= 2 and ex["document"]


def test_local_jsonl_errors_are_one_line(tmp_path):
    from qgplm.data.seq2seq import load_examples

    (tmp_path / "a.jsonl").write_text('{"document": "x"}\n')
    task = SummarizationTaskConfig(name="xsum", data_dir=str(tmp_path), valid_size=1, test_size=1)
    with pytest.raises(QgplmError, match="needs the keys document and summary"):
        load_examples(task)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"document": f"d{i}", "summary": "s"}) + "\n"
                                              for i in range(3)))
    task.valid_size = 2
    with pytest.raises(QgplmError, match="leaves no training data"):
        load_examples(task)
    with pytest.raises(QgplmError, match="holds no \\*.jsonl"):
        load_examples(SummarizationTaskConfig(name="xsum", data_dir=str(tmp_path / "..")))


def test_personachat_needs_data_dir_and_valid_format(tmp_path):
    from qgplm.data.personachat import load_dialogs

    with pytest.raises(QgplmError, match="pass task.data_dir"):
        load_dialogs(PersonaChatTaskConfig(name="personachat", valid_size=1))
    (tmp_path / "personachat_self_original.json").write_text(json.dumps({"train": [{"personality": []}],
                                                                          "valid": []}))
    with pytest.raises(QgplmError, match="needs personality and utterances"):
        load_dialogs(PersonaChatTaskConfig(name="personachat", data_dir=str(tmp_path), valid_size=1))


def test_personachat_eval_rows_have_gold_last_and_reply_only_labels(tmp_path):
    run = RunConfig.from_hydra(compose_run([*TINY_PERSONA, "task.num_candidates=3"], tmp_path))
    tok, dm = prepare_data(run)
    batch = next(iter(dm.test_dataloader()))
    assert batch["input_ids"].shape[0] == 3 * run.task.eval_batch_size
    assert batch["gold"].tolist()[:3] == [False, False, True]
    gold_row = batch["labels"][2]
    reply = tok.decode(gold_row[gold_row != -100])
    turn0 = json.loads((FIXTURE / "personachat_self_original.json").read_text())["valid"][0]["utterances"][0]
    assert reply.strip() == turn0["candidates"][-1] + tok.eos_token


# ----------------------------------------------------------------------------- metrics / losses
def test_rouge_scores_and_sentence_split():
    from qgplm.tasks.evaluation import rouge_scores, split_sentences

    assert split_sentences("A cat sat. It ran!\nThen home") == "A cat sat.\nIt ran!\nThen home"
    same = rouge_scores(["the cats sat on the mat"], ["The cat sat on the mat."], ["rouge1", "rouge2", "rougeLsum"])
    assert same == {"rouge1": pytest.approx(100.0), "rouge2": pytest.approx(100.0), "rougeLsum": pytest.approx(100.0)}
    none = rouge_scores(["zebra"], ["the cat"], ["rouge1"])
    assert none["rouge1"] == 0.0


def test_ranking_evaluator_counts_gold_first():
    from qgplm.tasks.evaluation import RankingEvaluator

    class Fake(torch.nn.Module):
        def forward(self, input_ids, attention_mask):  # log-probs favour token 5
            logits = torch.zeros(*input_ids.shape, 8)
            logits[..., 5] = 4.0
            return type("O", (), {"logits": logits})()

    ev = RankingEvaluator()
    # two turns, two candidates each; turn 0: gold (last) says token 5, turn 1: the distractor does
    ids = torch.tensor([[1, 3], [1, 5], [1, 5], [1, 3]])
    labels = torch.tensor([[-100, 3], [-100, 5], [-100, 5], [-100, 3]])
    ev.update(Fake(), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                       "group": torch.tensor([0, 0, 1, 1]), "gold": torch.tensor([False, True, False, True])})
    assert ev.compute() == {"accuracy": 50.0}


def _tiny_bart_pair():
    from transformers import BartConfig, BartForConditionalGeneration

    from qgplm.quant import QuantConfig, quantize_model

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
    teacher = BartForConditionalGeneration(cfg).eval()
    import copy

    student = quantize_model(copy.deepcopy(teacher), QuantConfig(weight_bits=2, embedding_bits=2, activation_bits=8))
    batch = {"input_ids": torch.randint(3, 50, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long),
             "labels": torch.tensor([[5, 6, 7, 2, -100], [8, 9, 10, 11, 2]])}
    return teacher, student, batch


def test_distill_seq2seq_contrasts_decoder_states_and_optionally_encoder():
    from qgplm.distill import MemoryBank
    from qgplm.train.config import DistillConfig, OptimConfig
    from qgplm.train.module import DistillModule, model_forward

    teacher, student, batch = _tiny_bart_pair()
    fwd = model_forward(student, batch, layer=-1)
    # decoder inputs = labels shifted right after the start token; the mask follows the labels
    assert fwd.hidden_ids[0].tolist() == [2, 5, 6, 7, 2]
    assert fwd.mask[0].tolist() == [True, True, True, True, False]
    assert fwd.hidden.shape == (2, 5, 16)
    for encoder in (False, True):
        module = DistillModule(student, teacher, DistillConfig(contrast_encoder=encoder), OptimConfig(), 10)
        module.attach_memory_bank(MemoryBank(50, 16), MemoryBank(50, 16) if encoder else None)
        module.log = lambda *a, **k: None
        loss = module.training_step(batch, 0)
        assert torch.isfinite(loss)
        loss.backward()
        assert module.pop_bank_update() is not None
        assert (module.pop_encoder_bank_update() is not None) == encoder
    with pytest.raises(QgplmError, match="contrast_encoder=true needs an encoder-decoder"):
        from transformers import GPT2Config, GPT2LMHeadModel

        gpt = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
        DistillModule(gpt, gpt, DistillConfig(contrast_encoder=True), OptimConfig(), 10)


def test_tiny_bart_stage_quantize_from_a_teacher_run_dir(tmp_path):
    """stage=teacher, then stage=quantize teacher_path=<run dir>: the saved BART and its trained
    tokenizer are reloaded, the teacher re-evaluated and the student distilled (the benchmark path)."""
    common = [*TINY_BART, "task.bpe_vocab_size=500", "task.max_eval_examples=2", "generate_samples=0"]
    _run(compose_run([*common, "stage=teacher"], tmp_path / "t"))
    run, m = _run(compose_run([*common, "stage=quantize", f"teacher_path={tmp_path / 't'}", "method=pact"],
                              tmp_path / "q"))
    assert m["config"]["method"] == "pact" and "rouge2" in m["student"] and "rouge2" in m["teacher"]
    assert (tmp_path / "q" / "summaries_student.jsonl").is_file()
