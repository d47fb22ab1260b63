"""trainer=ddp_sim: two CPU ranks (gloo) through Lightning's script launcher, as on GPUs.

- the memory bank is identical on both ranks (checksums gathered at the end of fit);
- the result matches one process with the same global batch (2 x 2 vs 1 x 4) within 1%: the
  global batches are identical (the sampler shards one permutation), gradients are averaged;
  what differs is that each rank draws contrastive negatives from its own half batch, and the
  float summation order;
- a Hydra multirun of DDP jobs gives every job its own finished run dir.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY, run_cli

QAT = [*TINY, "stage=quantize", "student.max_steps=6", "student.eval_every=3", "generate_samples=0"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp") / "teacher"
    proc = run_cli([*TINY, "stage=teacher", f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_ddp_ranks_share_one_bank_and_match_a_single_process(teacher, tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    proc = run_cli([*QAT, f"teacher_path={teacher}", "trainer=ddp_sim", "task.batch_size=2", f"hydra.run.dir={ddp}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli([*QAT, f"teacher_path={teacher}", "task.batch_size=4", f"hydra.run.dir={single}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    m_ddp, m_one = (json.loads((d / "metrics.json").read_text()) for d in (ddp, single))
    assert m_ddp["world_size"] == 2 and m_one["world_size"] == 1
    banks = m_ddp["memory_bank_checksums"]
    assert len(banks) == 2 and banks[0] == banks[1]
    assert m_ddp["student"]["test_ppl"] == pytest.approx(m_one["student"]["test_ppl"], rel=0.01)
    assert (ddp / "run_rank1.log").is_file()  # rank 1 ran in the same run dir, with its own log


@pytest.mark.slow
def test_multirun_of_ddp_jobs_gives_each_job_its_own_dir(teacher, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *QAT, f"teacher_path={teacher}", "trainer=ddp_sim", "task.batch_size=2",
                    "method=quantgpt,kd_only", f"hydra.sweep.dir={sweep}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    methods = [json.loads((sweep / str(i) / "metrics.json").read_text())["config"]["method"] for i in (0, 1)]
    assert methods == ["quantgpt", "kd_only"]
    assert not any(p.name.startswith("0") for p in (sweep / "1").iterdir())  # no job nested in another


def test_slurm_launcher_composes_for_multi_node(tmp_path):
    """Multi-node: hydra/launcher=submitit_slurm (hydra-submitit-launcher) with trainer.num_nodes."""
    proc = run_cli(["hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.num_nodes=2", "hydra.launcher.nodes=2",
                    "hydra.launcher.tasks_per_node=8", "hydra.launcher.gpus_per_node=8", "--cfg", "all"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SlurmLauncher" in proc.stdout and "num_nodes: 2" in proc.stdout and "tasks_per_node: 8" in proc.stdout
