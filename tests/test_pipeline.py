"""The composed Hydra config, end to end, offline, on tiny sizes."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

from qgplm.quant import quantized_modules
from qgplm.train.config import RunConfig
from qgplm.train.pipeline import run_stages
from tests.conftest import SHARED_DATA


def _run(cfg):
    run = RunConfig.from_hydra(cfg)
    return run, run_stages(run, cfg.trainer, cfg.get("logger"), cfg.get("callbacks"))


def test_pipeline_fast_dev_run_writes_everything(tiny_cfg, tmp_path):
    run, metrics = _run(tiny_cfg("trainer.fast_dev_run=true"))
    assert (tmp_path / "teacher" / "config.json").is_file()
    assert (tmp_path / "teacher" / "tokenizer.json").is_file()
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["config"]["bits"] == "W2E2A8" and on_disk["config"]["method"] == "quantgpt"
    for key in ("teacher", "student", "ppl_ratio", "size", "protocol", "wall_time_s", "samples"):
        assert key in on_disk
    assert on_disk["student"]["test_ppl"] > 1 and on_disk["teacher"]["test_ppl"] > 1
    assert on_disk["size"]["compression"] > 1
    assert on_disk["protocol"]["block_size"] == 32


def test_pipeline_trains_and_checkpoints(tiny_cfg, tmp_path):
    run, metrics = _run(tiny_cfg())
    for stage in ("teacher", "student"):
        assert (tmp_path / "checkpoints" / stage / "last.ckpt").is_file()
        assert (tmp_path / "checkpoints" / stage / "best.ckpt").is_file()
    ckpt = torch.load(tmp_path / "checkpoints" / "student" / "last.ckpt", weights_only=True)
    # the frozen teacher is not in the student's checkpoint; quantizer scales and bank are
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert any(k.endswith("weight_quantizer.gamma") for k in ckpt["state_dict"])
    bank = ckpt["callbacks"]["MemoryBankCallback"]["bank"]
    assert bank["filled"].any()
    assert metrics["teacher"]["best_val_ppl"] is not None


def test_bits_fp_is_plain_distillation(tiny_cfg):
    cfg = tiny_cfg("bits=fp", "trainer.fast_dev_run=true")
    run, metrics = _run(cfg)
    assert run.quant.is_full_precision and run.quant.tag == "W32E32A32"
    assert metrics["size"]["compression"] == pytest.approx(1.0)


def test_bits_fp_student_starts_equal_to_teacher(tiny_cfg):
    """With bits=fp no module is swapped, so before any step the student is the teacher and the
    KD loss is the teacher's own entropy: QAT is plain distillation."""
    import copy

    from qgplm.distill import soft_cross_entropy
    from qgplm.models import build_model
    from qgplm.quant import quantize_model
    from qgplm.train.module import DistillModule
    from qgplm.train.pipeline import prepare_data

    run = RunConfig.from_hydra(tiny_cfg("bits=fp"))
    tok, dm = prepare_data(run)
    teacher = build_model(run.model, tok, run.task.block_size).eval()
    student = quantize_model(copy.deepcopy(teacher), run.quant)
    assert not list(quantized_modules(student))
    # wrapped as training does: DistillModule turns the student's dropout off and .eval() sets eval mode
    DistillModule(student, teacher, run.method.distill, run.student.optim, 1).eval()
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"]).logits
        s = student(input_ids=batch["input_ids"]).logits
    assert torch.equal(s, t)
    ent = soft_cross_entropy(t, t)
    p = torch.softmax(t, -1)
    assert ent.item() == pytest.approx(-(p * torch.log_softmax(t, -1)).sum(-1).mean().item(), rel=1e-5)


def test_stage_quantize_reuses_a_saved_teacher(tiny_cfg, tmp_path):
    teacher_run = tmp_path / "teacher_run"
    from tests.conftest import compose_cfg

    _run(compose_cfg(["stage=teacher", "trainer.fast_dev_run=true"], teacher_run))
    assert not (teacher_run / "checkpoints" / "student").exists()
    metrics_t = json.loads((teacher_run / "metrics.json").read_text())
    assert "student" not in metrics_t
    q_run = tmp_path / "q_run"
    _, metrics = _run(compose_cfg(["stage=quantize", f"teacher_path={teacher_run}", "bits=4",
                                   "trainer.fast_dev_run=true"], q_run))
    assert metrics["config"]["bits"] == "W4E4A8"
    # the teacher evaluated in stage=quantize is the saved one: same test PPL
    assert metrics["teacher"]["test_ppl"] == pytest.approx(metrics_t["teacher"]["test_ppl"], rel=1e-5)


def test_student_max_steps_0_is_post_training_quantization(tiny_cfg, tmp_path):
    """student.max_steps=0 takes no optimizer step (no fit, no checkpoint, no training batch): the test
    PPL is that of the teacher's weights under each quantizer's initial scale."""
    from tests.conftest import compose_cfg

    teacher_run = tmp_path / "teacher_run"
    _run(compose_cfg(["stage=teacher", "teacher.max_steps=2"], teacher_run))
    _, metrics = _run(compose_cfg(["stage=quantize", f"teacher_path={teacher_run}", "student.max_steps=0"],
                                  tmp_path / "ptq"))
    assert not list((tmp_path / "ptq" / "checkpoints").rglob("*.ckpt"))  # no fit: no checkpoint written
    assert not (metrics["student"].get("train_throughput") or {}).get("batches_timed")  # no training batch
    assert metrics["student"]["test_ppl"] > 1


def test_wikitext2_local_files(tiny_cfg):
    data_dir = SHARED_DATA / "wikitext-2"
    if not data_dir.is_dir():
        pytest.fail(f"offline data missing: {data_dir}")
    run, metrics = _run(tiny_cfg("task=wikitext2", f"task.data_dir={data_dir}", "trainer.fast_dev_run=true",
                                 "task.block_size=32"))
    assert metrics["config"]["task"] == "wikitext2"
    assert metrics["protocol"]["tokens"]["train"] == 4000


def test_ptb_local_files(tiny_cfg):
    run, metrics = _run(tiny_cfg("task=ptb", f"task.data_dir={SHARED_DATA / 'ptb'}", "trainer.fast_dev_run=true"))
    assert metrics["config"]["task"] == "ptb"


def test_scales_initialised_at_fit_start_and_kept_on_resume(tiny_cfg, tmp_path):
    """ScaleWarmupCallback initialises gamma once; a resumed fit keeps the checkpointed scales."""
    import copy

    from qgplm.models import build_model
    from qgplm.quant import quantize_model, weight_quantizers
    from qgplm.train.callbacks import MemoryBankCallback, ScaleWarmupCallback
    from qgplm.train.module import DistillModule
    from qgplm.train.pipeline import prepare_data

    run = RunConfig.from_hydra(tiny_cfg())
    tok, dm = prepare_data(run)
    teacher = build_model(run.model, tok, run.task.block_size)

    def fit(steps, ckpt=None):
        student = quantize_model(copy.deepcopy(teacher).requires_grad_(True), run.quant)
        module = DistillModule(student, teacher, run.method.distill, run.student.optim, 10)
        bank_cb = MemoryBankCallback()
        trainer = pl.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, limit_val_batches=0,
                             callbacks=[ScaleWarmupCallback(), bank_cb], default_root_dir=tmp_path,
                             enable_checkpointing=False)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        return trainer, module, bank_cb

    trainer, module, bank_cb = fit(2)
    gammas = {n: q.gamma.detach().clone() for n, q, _ in weight_quantizers(module.student)}
    assert all(bool(q.initialized) for _, q, _ in weight_quantizers(module.student))
    assert any(abs(g.item() - 1.4) > 1e-3 for g in gammas.values())  # mse init, not the fallback
    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(path)
    bank_before = bank_cb.bank.bank.clone()

    # resume: restore at step 2 and run 0 more steps -> scales and bank exactly as saved
    trainer2, module2, bank_cb2 = fit(2, ckpt=str(path))
    for n, q, _ in weight_quantizers(module2.student):
        assert torch.equal(q.gamma.detach(), gammas[n]), n
    assert torch.equal(bank_cb2.bank.bank, bank_before)


@pytest.mark.parametrize("negatives", ["student", "random"])
def test_contrastive_negative_ablations_train(tiny_cfg, negatives):
    run, metrics = _run(tiny_cfg(f"method.distill.negatives={negatives}", "trainer.fast_dev_run=true",
                                 "generate_samples=0"))
    assert run.method.distill.negatives == negatives
    assert metrics["student"]["test_ppl"] > 1


@pytest.mark.parametrize("method", ["pact", "lsq", "laq", "twn", "minmax", "kd_only", "quantgpt_no_contrastive",
                                    "quantgpt_pact_grad"])
def test_every_method_runs_end_to_end(tiny_cfg, method):
    run, metrics = _run(tiny_cfg(f"method={method}", "trainer.fast_dev_run=true", "generate_samples=0"))
    assert metrics["config"]["method"] == method and metrics["student"]["test_ppl"] > 1


def test_quantize_attention_through_the_config(tiny_cfg):
    run, metrics = _run(tiny_cfg("method.quantize_attention=true", "trainer.fast_dev_run=true", "generate_samples=0"))
    assert run.quant.quantize_attention and metrics["student"]["test_ppl"] > 1


def test_memory_bank_updated_once_per_optimizer_step_with_gradient_accumulation(tiny_cfg, tmp_path):
    """trainer.accumulate_grad_batches=2: the bank moves after the optimizer step, not after every
    micro-batch. Both micro-batches of a step query the bank as it was at the step's
    start, and the step writes the updates of both at once, as one batch of twice the size would
    (a token in both micro-batches gets the mean of its queries)."""
    import copy

    from lightning.pytorch.callbacks import Callback

    from qgplm.distill import MemoryBank
    from qgplm.models import build_model
    from qgplm.quant import quantize_model
    from qgplm.train.callbacks import MemoryBankCallback, ScaleWarmupCallback
    from qgplm.train.module import DistillModule
    from qgplm.train.pipeline import prepare_data

    run = RunConfig.from_hydra(tiny_cfg())
    tok, dm = prepare_data(run)
    teacher = build_model(run.model, tok, run.task.block_size)
    student = quantize_model(copy.deepcopy(teacher).requires_grad_(True), run.quant)
    module = DistillModule(student, teacher, run.method.distill, run.student.optim, 10)
    updates, snapshots = [], []
    real_pop = module.pop_bank_update

    def pop():
        upd = real_pop()
        updates.append(tuple(t.clone() for t in upd))
        return upd

    module.pop_bank_update = pop
    bank_cb = MemoryBankCallback(momentum=run.method.distill.momentum)

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots.append((trainer.global_step, bank_cb.bank.bank.clone(), bank_cb.bank.filled.clone()))

    trainer = pl.Trainer(max_steps=2, accumulate_grad_batches=2, logger=False, enable_progress_bar=False,
                         limit_val_batches=0, callbacks=[ScaleWarmupCallback(), bank_cb, Spy()],
                         default_root_dir=tmp_path, enable_checkpointing=False)
    trainer.fit(module, datamodule=dm)
    assert [s[0] for s in snapshots] == [0, 0, 1, 1] and len(updates) == 4

    def expected(start_bank, start_filled, micro):
        bank = MemoryBank(*start_bank.shape, run.method.distill.momentum)
        bank.bank.copy_(start_bank)
        bank.filled.copy_(start_filled)
        ids, q, mask = (torch.cat([u[i].reshape(-1, *u[i].shape[2:]) for u in micro]) for i in range(3))
        bank.update(ids, q, mask)
        return bank

    # micro-batch 1 sees the bank of the step start (still empty), not micro-batch 0's update
    assert not snapshots[0][2].any()
    assert torch.equal(snapshots[1][1], snapshots[0][1]) and torch.equal(snapshots[1][2], snapshots[0][2])
    # after step 1: both micro-batches' updates at once
    first = expected(snapshots[0][1], snapshots[0][2], updates[0:2])
    assert torch.equal(snapshots[2][1], first.bank) and torch.equal(snapshots[2][2], first.filled)
    assert torch.equal(snapshots[3][1], snapshots[2][1])
    second = expected(first.bank, first.filled, updates[2:4])
    assert torch.equal(bank_cb.bank.bank, second.bank) and torch.equal(bank_cb.bank.filled, second.filled)
    assert not torch.equal(second.bank, first.bank)


def test_memory_bank_queue_joins_micro_batches_of_different_lengths():
    """Seq2seq micro-batches are padded to their own lengths: the queued updates of one step are
    joined position by position (one [1, N] update), and the bank gets the mean of a token's
    queries across them."""
    from types import SimpleNamespace

    from qgplm.distill import MemoryBank
    from qgplm.train.callbacks import MemoryBankCallback

    cb = MemoryBankCallback(momentum=0.5)
    cb.bank = MemoryBank(6, 2, 0.5)
    micro = [(torch.tensor([[1, 2, 0]]), torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]]),
              torch.tensor([[True, True, False]])),
             (torch.tensor([[1, 3, 4, 0, 0]]), torch.tensor([[[3.0, 2.0], [1.0, 1.0], [2.0, 2.0], [9.0, 9.0],
                                                              [9.0, 9.0]]]),
              torch.tensor([[True, True, True, False, False]]))]
    trainer = SimpleNamespace(global_step=0, world_size=1)
    module = SimpleNamespace(pop_bank_update=lambda: micro.pop(0))
    for stepped in (False, True):
        cb.on_train_batch_start(trainer, module, None, 0)
        if stepped:
            trainer.global_step = 1
        cb.on_train_batch_end(trainer, module, None, None, 0)
        if not stepped:
            assert not cb.bank.filled.any()  # nothing written before the optimizer step
    assert cb.bank.filled.tolist() == [False, True, True, True, True, False]
    assert cb.bank.bank[1].tolist() == [2.0, 1.0]  # mean of [1, 0] and [3, 2]
    assert cb.bank.bank[2].tolist() == [0.0, 1.0] and cb.bank.bank[4].tolist() == [2.0, 2.0]


def test_contrastive_projection_head_trains_and_is_checkpointed(tiny_cfg, tmp_path):
    """method.distill.projection=linear (the method's optional head (docs/method.md), off by default): a linear map of
    the student's contrastive representations, trained with the student and saved in its
    checkpoint; not part of the student model (the export and the evaluation never see it)."""
    run, metrics = _run(tiny_cfg("method.distill.projection=linear", "stage=pipeline", "generate_samples=0"))
    assert run.method.distill.projection == "linear"
    ckpt = torch.load(tmp_path / "checkpoints" / "student" / "last.ckpt", weights_only=True)
    sd = ckpt["state_dict"]
    weight, bias = sd["projection.weight"], sd["projection.bias"]
    hidden = 32
    assert weight.shape == (hidden, hidden) and bias.shape == (hidden,)
    assert not torch.equal(weight, torch.eye(hidden))  # trained (it starts as the identity)
    assert not any(k.startswith("model.") and "projection" in k for k in sd)
    assert metrics["student"]["test_ppl"] > 1
    assert (tmp_path / "export" / "model.safetensors").is_file()  # the export ignores the head


def test_contrastive_projection_head_starts_as_identity_and_gets_gradient(tiny_cfg):
    import copy

    from qgplm.models import build_model
    from qgplm.quant import quantize_model
    from qgplm.train.module import DistillModule
    from qgplm.train.pipeline import prepare_data

    def step(projection):
        run = RunConfig.from_hydra(tiny_cfg(f"method.distill.projection={projection}"))
        tok, dm = prepare_data(run)
        torch.manual_seed(0)
        teacher = build_model(run.model, tok, run.task.block_size)
        student = quantize_model(copy.deepcopy(teacher).requires_grad_(True), run.quant)
        module = DistillModule(student, teacher, run.method.distill, run.student.optim, 10)
        module.log = lambda *a, **k: None
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        loss = module.training_step(batch, 0)
        loss.backward()
        return module, loss

    plain, loss_plain = step("none")
    head, loss_head = step("linear")
    assert plain.projection is None
    assert torch.equal(head.projection.weight.detach(), torch.eye(32))
    torch.testing.assert_close(loss_head, loss_plain, rtol=1e-6, atol=1e-7)  # identity at the start
    assert head.projection.weight.grad is not None and head.projection.weight.grad.abs().sum() > 0
    in_optimizer = {id(p) for g in head.param_groups() for p in g["params"]}
    assert id(head.projection.weight) in in_optimizer and id(head.projection.bias) in in_optimizer
    assert not any(id(p) in in_optimizer for p in head.teacher.parameters())
    # a checkpoint of the other setting is refused on resume, with the setting to use
    from qgplm.errors import QgplmError

    with pytest.raises(QgplmError, match="method.distill.projection=none"):
        head.on_load_checkpoint({"state_dict": {k: v for k, v in plain.state_dict().items()}})
    with pytest.raises(QgplmError, match="method.distill.projection=linear"):
        plain.on_load_checkpoint({"state_dict": {k: v for k, v in head.state_dict().items()}})
