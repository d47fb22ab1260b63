"""FSDP with QAT, on CPU.

Run here (2 CPU processes, gloo):
- torch's FSDP2 (`fully_shard`, through qgplm.train.fsdp) on a tiny quantized GPT-2 in raw
  torch.multiprocessing: the student is quantized and its scales initialised from the full weights
  *before* sharding (as qgplm does: quantize_model in the pipeline, ScaleWarmupCallback.setup);
  the sharded forward/backward, the gradient norm (sharded + replicated) and the gathered
  unsharded copy equal the unsharded model's, and the quantizer state (gamma, `initialized`)
  survives a full state-dict save and a load into a fresh model, sharded or not;
- `trainer=fsdp2_sim` (Lightning's ModelParallelStrategy, the trainer=fsdp2 code path) through
  `python -m qgplm.run`: teacher and student stages sharded, the result equal to trainer=ddp_sim's
  on the same global batch, last.ckpt holding the full quantizer state, and a run SIGKILLed mid-QAT
  and resumed with ckpt_path= ending where the uninterrupted run ends.
Not run here: `trainer=fsdp2` on GPUs (only its config is composed and instantiated), and
`trainer=fsdp` (Lightning's FSDPStrategy, FSDP1): GPU only, Lightning's accelerator connector
refuses it with accelerator=cpu and torch's FSDP1 raises "FSDP needs a non-CPU accelerator device"
on CPU; its config is composed and instantiated.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import GPT2Config, GPT2LMHeadModel

from qgplm.distill import soft_cross_entropy
from qgplm.quant import QuantConfig, initialize_quantizers, quantize_model, scale_parameters
from tests.conftest import TINY, run_cli

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("torch without FSDP2 fully_shard", allow_module_level=True)


def _student(seed: int = 0):
    torch.manual_seed(seed)
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                         bos_token_id=0, eos_token_id=0)).eval()
    student = quantize_model(copy.deepcopy(teacher), QuantConfig(weight_bits=2, embedding_bits=2, activation_bits=8))
    return teacher, student


def _loss(student, teacher, x):
    with torch.no_grad():
        t = teacher(x).logits
    return soft_cross_entropy(student(x).logits, t)


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from qgplm.train.fsdp import (
        clip_grad_norm_,
        fully_shard_quantized,
        gather_full_model,
        meta_template,
        sync_scale_grads,
        transformer_blocks,
    )

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        teacher, student = _student()
        assert initialize_quantizers(student) > 0  # from the full weights, before sharding
        reference = copy.deepcopy(student)
        template = meta_template(student)
        assert transformer_blocks(student) == list(student.transformer.h)
        fully_shard_quantized(student, transformer_blocks(student))
        x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))  # same batch on both ranks
        loss = _loss(student, teacher, x)
        loss.backward()
        sync_scale_grads(student)
        ref_loss = _loss(reference, teacher, x)
        ref_loss.backward()
        assert torch.allclose(loss, ref_loss, rtol=1e-5), (loss, ref_loss)
        # gradients (mean over the ranks' identical batches = the reference's), gathered to full tensors
        for (name, p), (_, q) in zip(student.named_parameters(), reference.named_parameters(), strict=True):
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            assert torch.allclose(g, q.grad, rtol=1e-4, atol=1e-7), name
        # the global norm of sharded (DTensor) and replicated gradients: torch's on the whole model
        big = 1e9  # no clipping: compare the norms
        norm = clip_grad_norm_(student.parameters(), big)
        assert torch.allclose(norm, torch.nn.utils.clip_grad_norm_(reference.parameters(), big), rtol=1e-5)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
        opt.step()
        full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True))
        gammas = {k: v for k, v in full.items() if k.endswith("weight_quantizer.gamma")}
        want = {k for k in reference.state_dict() if k.endswith("weight_quantizer.gamma")}
        assert set(gammas) <= want and len(gammas) >= 9
        assert all(bool(full[k.replace("gamma", "initialized")]) for k in gammas)
        assert any(not torch.equal(v, reference.state_dict()[k]) for k, v in gammas.items())  # the step moved gamma
        # load into a fresh, uninitialised model: plain and sharded
        _, fresh = _student(seed=5)
        missing, unexpected = fresh.load_state_dict(full, strict=False)
        assert not unexpected and all(k.startswith("lm_head.") for k in missing)  # the tied head: stored once
        assert all(bool(q.initialized) for q in fresh.modules() if hasattr(q, "gamma"))
        _, fresh_sharded = _student(seed=5)
        with pytest.raises(RuntimeError, match="not initialised"):
            fully_shard_quantized(fresh_sharded)  # scales from shards would be wrong: refused
        initialize_quantizers(fresh_sharded)
        fully_shard_quantized(fresh_sharded, fresh_sharded.transformer.h)
        set_model_state_dict(fresh_sharded, copy.deepcopy(full), options=StateDictOptions(full_state_dict=True))
        again = get_model_state_dict(fresh_sharded, options=StateDictOptions(full_state_dict=True))
        whole = gather_full_model(student, template, "cpu")  # an ordinary model, on every rank
        assert not any(hasattr(p, "full_tensor") for p in whole.parameters())
        assert whole.lm_head.weight is whole.transformer.wte.weight  # still tied
        for k, v in full.items():
            assert torch.equal(whole.state_dict()[k], v), k
        with torch.no_grad():
            assert torch.allclose(whole(x).logits, student(x).logits, rtol=1e-5, atol=1e-6)
        if rank == 0:
            for k, v in full.items():
                assert torch.equal(again[k], v), k
                assert torch.equal(fresh.state_dict()[k], v), k
            assert torch.equal(fresh.lm_head.weight_quantizer.gamma, full["transformer.wte.weight_quantizer.gamma"])
            with torch.no_grad():
                same = torch.allclose(fresh(x).logits, student(x).logits, rtol=1e-5, atol=1e-6)
            torch.save({"gammas": gammas, "same_logits": same, "scales": len(scale_parameters(fresh))}, out)
        else:
            with torch.no_grad():
                student(x)  # the sharded forward is collective: rank 1 joins rank 0's
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~45 s on the 2-core machine
def test_fsdp2_quantized_student_on_two_gloo_ranks(tmp_path):
    out = tmp_path / "result.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True,
                       start_method="spawn")
    res = torch.load(out, weights_only=True)
    assert res["same_logits"] and res["scales"] == 9  # 2 blocks x 4 layers + the tied embedding / head


def test_scales_are_initialised_before_the_strategy_wraps_the_model(tmp_path):
    """ScaleWarmupCallback initialises at set-up, before strategy.setup (where FSDP shards and
    every strategy moves the model); a resumed fit leaves it to the checkpoint."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from qgplm.quant.quantizers import WeightQuantizer
    from qgplm.train.callbacks import ScaleWarmupCallback
    from qgplm.train.config import DistillConfig, OptimConfig
    from qgplm.train.module import DistillModule

    seen: list[list[bool]] = []

    class Spy(SingleDeviceStrategy):
        def setup(self, trainer):
            quantizers = [q for q in self.lightning_module.modules() if isinstance(q, WeightQuantizer)]
            seen.append([bool(q.initialized) for q in quantizers])
            super().setup(trainer)

    def fit(ckpt=None):
        teacher, student = _student()
        module = DistillModule(student, teacher, DistillConfig(contrastive_weight=0.0), OptimConfig(), 2)
        x = torch.randint(0, 64, (2, 16))
        data = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}] * 2
        cb = ScaleWarmupCallback()
        trainer = pl.Trainer(strategy=Spy(device=torch.device("cpu")), max_steps=2, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, callbacks=[cb], default_root_dir=tmp_path)
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None), ckpt_path=ckpt)
        return trainer, module, cb

    trainer, module, cb = fit()
    assert seen[0] and all(seen[0]) and cb.initialized_count == 9
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    gammas = [p.detach().clone() for p in scale_parameters(module.student)]
    _, module2, cb2 = fit(str(tmp_path / "a.ckpt"))
    assert all(seen[1])
    # the resumed fit ends with the checkpoint's scales (restored after set-up's initialisation)
    assert all(torch.equal(a, b) for a, b in zip(gammas, scale_parameters(module2.student), strict=True))
    _, fresh = _student()
    initialize_quantizers(fresh)
    # they differ from a fresh init
    assert any(not torch.equal(a, b) for a, b in zip(gammas, scale_parameters(fresh), strict=True))


def test_trainer_fsdp_keeps_fp32_parameters_under_bf16_mixed(tmp_path):
    """Lightning's bf16-mixed under FSDP would cast parameters (gamma too) and buffers to bf16;
    trainer=fsdp's mixed_precision casts nothing (autocast does the bf16 compute)."""
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg

    cfg = compose_cfg(["trainer=fsdp"], tmp_path)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.strategy.state_dict_type == "full"
    strategy = instantiate(cfg.trainer.strategy)
    mp = strategy.mixed_precision_config
    assert mp.param_dtype is None and mp.reduce_dtype is None and mp.buffer_dtype is None
    assert strategy.kwargs.get("use_orig_params") is True


def test_trainer_fsdp2_composes_model_parallel_with_full_checkpoints(tmp_path):
    """trainer=fsdp2: ModelParallelStrategy on the GPUs, bf16 autocast, single-file full checkpoints;
    trainer=fsdp2_sim: the same strategy on 2 CPU processes with gloo, fp32 like ddp_sim."""
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import ModelParallelStrategy

    from tests.conftest import compose_cfg

    cfg = compose_cfg(["trainer=fsdp2"], tmp_path)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.use_distributed_sampler is False
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, ModelParallelStrategy) and strategy._save_distributed_checkpoint is False
    sim = compose_cfg(["trainer=fsdp2_sim"], tmp_path)
    assert sim.trainer.accelerator == "cpu" and sim.trainer.devices == 2 and sim.trainer.precision == "32-true"
    strategy = instantiate(sim.trainer.strategy)
    assert isinstance(strategy, ModelParallelStrategy) and strategy.process_group_backend == "gloo"
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (2, 1)


def test_transformer_blocks_and_the_shard_mesh():
    from transformers import BartConfig, BartForConditionalGeneration

    from qgplm.train.fsdp import shard_mesh, transformer_blocks

    _, student = _student()
    assert transformer_blocks(student) == list(student.transformer.h)
    bart = BartForConditionalGeneration(BartConfig(d_model=16, encoder_layers=2, decoder_layers=3, vocab_size=50,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=32, decoder_ffn_dim=32))
    assert transformer_blocks(bart) == [*bart.model.encoder.layers, *bart.model.decoder.layers]

    class Mesh(dict):
        def __init__(self, dp, tp):
            super().__init__(data_parallel=_Dim(dp), tensor_parallel=_Dim(tp))

    class _Dim:
        def __init__(self, n):
            self.n = n

        def size(self):
            return self.n

    for dp, tp, want in [(2, 1, "data_parallel"), (1, 4, "tensor_parallel")]:
        mesh = Mesh(dp, tp)
        assert shard_mesh(mesh) is mesh[want]
    hsdp = Mesh(2, 4)
    assert shard_mesh(hsdp) is hsdp  # several nodes: replicate across, shard within


def test_configure_model_is_a_no_op_outside_model_parallel():
    from qgplm.train.config import DistillConfig, OptimConfig
    from qgplm.train.module import DistillModule

    teacher, student = _student()
    module = DistillModule(student, teacher, DistillConfig(contrastive_weight=0.0), OptimConfig(), 2)
    module.configure_model()  # no trainer: nothing to shard
    assert module.gather_full_model() is student


# ------------------------------------------------------------------ trainer=fsdp2_sim through qgplm.run

# the resume test's run (tests/test_resume.py): evaluation and checkpoints every 2 steps, random negatives
FSDP_RUN = [*TINY, "teacher.max_steps=4", "student.max_steps=8", "student.eval_every=2", "generate_samples=0",
            "method.distill.negatives=random", "task.batch_size=2"]


def _last(run) -> dict:
    return torch.load(run / "checkpoints" / "student" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """trainer=fsdp2_sim and trainer=ddp_sim on the same global batch (2 x 2), stage=pipeline (both
    stages under the strategy); an fsdp2_sim run SIGKILLed after its step-4 checkpoint, resumed."""
    root = tmp_path_factory.mktemp("fsdp2")
    runs = {name: root / name for name in ("fsdp", "ddp", "killed", "resume_log")}
    proc = run_cli([*FSDP_RUN, "trainer=fsdp2_sim", f"hydra.run.dir={runs['fsdp']}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli([*FSDP_RUN, "trainer=ddp_sim", f"hydra.run.dir={runs['ddp']}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    os.environ["QGPLM_KILL_AT_STEP"] = "student:4"
    try:
        proc = run_cli([*FSDP_RUN, "trainer=fsdp2_sim", f"hydra.run.dir={runs['killed']}"])
    finally:
        os.environ.pop("QGPLM_KILL_AT_STEP", None)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert _last(runs["killed"])["global_step"] == 4 and not (runs["killed"] / "metrics.json").exists()
    ckpt = runs["killed"] / "checkpoints" / "student" / "last.ckpt"
    proc = run_cli([*FSDP_RUN, "trainer=fsdp2_sim", f"ckpt_path={ckpt}", f"hydra.run.dir={runs['resume_log']}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs


@pytest.mark.slow  # four 2-process runs (the fixture): ~55 s on the 2-core machine
def test_fsdp2_sim_pipeline_equals_ddp_sim_and_saves_the_full_quantizer_state(fsdp_runs):
    fsdp, ddp = fsdp_runs["fsdp"], fsdp_runs["ddp"]
    log = (fsdp / "run.log").read_text()
    assert "FSDP2: GPT2LMHeadModel sharded in 1 blocks" in log  # the teacher stage and the student stage
    assert log.count("FSDP2: ") == 2 and "quantizer scales replicated" in log
    m, m_ddp = (json.loads((d / "metrics.json").read_text()) for d in (fsdp, ddp))
    assert m["world_size"] == 2 and math.isfinite(m["student"]["test_ppl"]) and math.isfinite(m["teacher"]["test_ppl"])
    banks = m["memory_bank_checksums"]
    assert len(banks) == 2 and banks[0] == banks[1]
    # the same global batches, gradients averaged over the same ranks: DDP's result, up to summation order
    assert m["teacher"]["test_ppl"] == pytest.approx(m_ddp["teacher"]["test_ppl"], rel=1e-4)
    assert m["student"]["test_ppl"] == pytest.approx(m_ddp["student"]["test_ppl"], rel=1e-4)
    assert "error" not in m["export"] and (fsdp / "teacher" / "config.json").is_file()
    a, b = _last(fsdp), _last(ddp)
    assert a["global_step"] == b["global_step"] == 8 and a["state_dict"].keys() == b["state_dict"].keys()
    quantizer_keys = [k for k in a["state_dict"] if ".weight_quantizer." in k]
    assert any(k.endswith(".gamma") for k in quantizer_keys) and any(k.endswith(".initialized") for k in quantizer_keys)
    for k, v in a["state_dict"].items():  # full tensors (not shards), equal to DDP's whole model
        assert v.shape == b["state_dict"][k].shape, k
        assert torch.allclose(v.float(), b["state_dict"][k].float(), rtol=1e-4, atol=1e-6), k
    assert all(bool(a["state_dict"][k]) for k in quantizer_keys if k.endswith(".initialized"))


@pytest.mark.slow  # shares fsdp_runs
def test_fsdp2_sim_resumed_run_equals_the_uninterrupted_run(fsdp_runs):
    """The resumed fit restores the checkpoint's scales (not re-initialised from the weights at set-up),
    weights, optimizer state, memory bank and RNG: it ends where the uninterrupted run ends."""
    full, killed = fsdp_runs["fsdp"], fsdp_runs["killed"]
    a, b = _last(full), _last(killed)
    assert a["global_step"] == b["global_step"] == 8 and a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    bank_a, bank_b = a["callbacks"]["MemoryBankCallback"]["bank"], b["callbacks"]["MemoryBankCallback"]["bank"]
    assert all(torch.equal(bank_a[k], bank_b[k]) for k in bank_a)
    for name, state in a["optimizer_states"][0]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer_states"][0]["state"][name]["exp_avg"])
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (full, killed))
    assert ma["student"] == mb["student"] and mb["resumed_from"].endswith("last.ckpt")


def test_projection_check_on_resume_reads_the_checkpoint_metadata_under_fsdp2():
    """ModelParallelStrategy loads the weights itself and hands on_load_checkpoint the rest: the
    head's presence comes from checkpoint["qgplm"]["projection"] (written by every run)."""
    from qgplm.errors import QgplmError
    from qgplm.train.config import DistillConfig, OptimConfig
    from qgplm.train.module import DistillModule

    teacher, student = _student()
    module = DistillModule(student, teacher, DistillConfig(contrastive_weight=0.0), OptimConfig(), 2)
    saved = {"state_dict": {}, "qgplm": {}}
    module.on_save_checkpoint(saved)
    assert saved["qgplm"]["projection"] == "none"
    module.on_load_checkpoint({"qgplm": {"projection": "none"}})
    module.on_load_checkpoint({"qgplm": {}})  # an older checkpoint: nothing to check against
    with pytest.raises(QgplmError, match="projection=linear"):
        module.on_load_checkpoint({"qgplm": {"projection": "linear"}})
