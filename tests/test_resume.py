"""Exact resume: a run SIGKILLed mid-QAT and resumed with ckpt_path= ends where an uninterrupted
run ends, bit for bit on CPU (weights, quantizer scales, memory bank, metrics)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from qgplm.data.sampling import ResumableRandomSampler
from tests.conftest import TINY, run_cli

# random contrastive negatives so the RNG state matters; evaluation (and checkpoints) every 2 steps
RUN = [*TINY, "teacher.max_steps=4", "student.max_steps=8", "student.eval_every=2", "generate_samples=0",
       "method.distill.negatives=random"]


def _ckpt_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "student" / "last.ckpt", map_location="cpu", weights_only=True)


def _run(args: list[str], env_kill: str | None = None):
    if env_kill is not None:
        os.environ["QGPLM_KILL_AT_STEP"] = env_kill
    try:
        return run_cli(args)
    finally:
        os.environ.pop("QGPLM_KILL_AT_STEP", None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    full, killed, resumed_log = root / "full", root / "killed", root / "resume_log"
    proc = _run([*RUN, f"hydra.run.dir={full}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run([*RUN, f"hydra.run.dir={killed}"], env_kill="student:4")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (killed / "metrics.json").exists()
    assert _ckpt_state(killed)["global_step"] == 4
    proc = _run([*RUN, f"ckpt_path={killed / 'checkpoints' / 'student' / 'last.ckpt'}", f"hydra.run.dir={resumed_log}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return full, killed


def test_resumed_run_equals_uninterrupted_run(runs):
    full, killed = runs
    a, b = _ckpt_state(full), _ckpt_state(killed)  # the resumed run continued in the killed run's dir
    assert a["global_step"] == b["global_step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert any(k.endswith("weight_quantizer.gamma") for k in a["state_dict"])
    bank_a, bank_b = a["callbacks"]["MemoryBankCallback"]["bank"], b["callbacks"]["MemoryBankCallback"]["bank"]
    assert all(torch.equal(bank_a[k], bank_b[k]) for k in bank_a)
    for name, state in a["optimizer_states"][0]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer_states"][0]["state"][name]["exp_avg"])
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (full, killed))
    for stage in ("student", "teacher"):  # every figure equal; throughput is wall-clock time, never reproducible
        assert {k: v for k, v in ma[stage].items() if k != "train_throughput"} == \
            {k: v for k, v in mb[stage].items() if k != "train_throughput"}, stage
    assert mb["resumed_from"].endswith("last.ckpt")


def test_resume_refuses_a_checkpoint_of_another_method(runs, tmp_path):
    _, killed = runs
    proc = run_cli([*RUN, "method=pact", f"ckpt_path={killed}", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 2
    assert "method=quantgpt" in proc.stderr and "method=pact" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_of_a_finished_run_is_refused(runs, tmp_path):
    _, killed = runs
    proc = run_cli([*RUN, f"ckpt_path={killed}", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 2 and "already finished" in proc.stderr


def test_truncated_checkpoint_is_refused(runs, tmp_path):
    _, killed = runs
    bad = tmp_path / "checkpoints" / "student" / "last.ckpt"
    bad.parent.mkdir(parents=True)
    data = (killed / "checkpoints" / "student" / "last.ckpt").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    proc = run_cli([*RUN, f"ckpt_path={bad}", f"hydra.run.dir={tmp_path / 'log'}"])
    assert proc.returncode == 2 and "truncated or corrupt" in proc.stderr and "Traceback" not in proc.stderr
    assert bad.read_bytes() == data[: len(data) // 2]  # left as it was


def test_sampler_reproduces_dataloader_shuffle_and_resumes_mid_epoch():
    data = list(range(37))
    ref = DataLoader(data, batch_size=4, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(3))
    epochs = [[b.tolist() for b in ref] for _ in range(3)]
    sampler = ResumableRandomSampler(len(data), seed=3)
    loader = DataLoader(data, batch_size=4, sampler=sampler, drop_last=True)
    for e in range(3):
        sampler.set_epoch(e)
        assert [b.tolist() for b in loader] == epochs[e]
    sampler.set_epoch(1)
    sampler.resume_at(3 * 4)  # three batches of epoch 1 done
    assert [b.tolist() for b in loader] == epochs[1][3:]
    assert [b.tolist() for b in loader] == epochs[1]  # the skip applies once


def test_sampler_splits_one_permutation_across_ranks():
    shares = [ResumableRandomSampler(10, seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    a, b = (list(s) for s in shares)
    assert len(a) == len(b) == 5 and not set(a) & set(b)
    assert sorted(a + b) == sorted(ResumableRandomSampler(10, seed=0).order(0))


def test_resumable_loader_keeps_the_last_partial_batch_when_asked():
    """Summarization / Persona-Chat keep partial batches: same order as DataLoader(shuffle=True)."""
    from qgplm.data.sampling import resumable_loader

    data = list(range(37))
    ref = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5))
    loader = resumable_loader(data, 4, seed=5, drop_last=False)
    assert [b.tolist() for b in loader] == [b.tolist() for b in ref]
    assert len([b for b in loader]) == 10  # 9 full batches + 1 of 1
