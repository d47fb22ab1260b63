"""FSDP with QAT, on CPU: torch's FSDP2 (`fully_shard`, through qgplm.fsdp) over a 2-process gloo
group on a tiny quantized GPT-2. The student is quantized and its scales initialised from the full weights
*before* sharding (as qgplm does: quantize_model in the pipeline, ScaleWarmupCallback.setup);
the sharded forward/backward equal the unsharded model's, and the quantizer state (gamma,
`initialized`) survives a full state-dict save and a load into a fresh model, sharded or not.
Lightning's FSDPStrategy itself needs GPUs (trainer=fsdp): not run here."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import GPT2Config, GPT2LMHeadModel

from qgplm.distill import soft_cross_entropy
from qgplm.quant import QuantConfig, initialize_quantizers, quantize_model, scale_parameters

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

    from qgplm.fsdp import fully_shard_quantized, sync_scale_grads

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        teacher, student = _student()
        assert initialize_quantizers(student) > 0  # from the full weights, before sharding
        reference = copy.deepcopy(student)
        fully_shard_quantized(student, student.transformer.h)
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
    res = torch.load(out, weights_only=False)
    assert res["same_logits"] and res["scales"] == 9  # 2 blocks x 4 layers + the tied embedding / head


def test_scales_are_initialised_before_the_strategy_wraps_the_model(tmp_path):
    """ScaleWarmupCallback initialises at set-up, before strategy.setup (where FSDP shards and
    every strategy moves the model); a resumed fit leaves it to the checkpoint."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from qgplm.callbacks import ScaleWarmupCallback
    from qgplm.config import DistillConfig, OptimConfig
    from qgplm.module import DistillModule
    from qgplm.quant.quantizers import WeightQuantizer

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
