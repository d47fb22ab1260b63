"""A shuffling sampler that can resume mid-epoch, so a resumed run sees the same batches.

Lightning restores the step counters from a checkpoint but not the position of a plain
`RandomSampler`: a run resumed mid-epoch would restart the epoch from its first batch and
diverge from an uninterrupted run. This sampler computes epoch `e`'s order from (seed, e) only,
so the order is a pure function of the epoch, and `resume_at(k)` skips the `k` samples the
interrupted run already trained on. The order is the one `DataLoader(shuffle=True,
generator=torch.Generator().manual_seed(seed))` produces (one int64 draw for the iterator's
base seed, a permutation, and RandomSampler's second permutation for the remainder, per epoch),
so an uninterrupted run trains on exactly the batches a plain shuffled loader with that seed
gives. With `num_replicas > 1` each rank takes its strided share of the same permutation (what
`DistributedSampler` does), so it also replaces that one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class ResumableRandomSampler(Sampler[int]):
    def __init__(self, num_samples: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.num_samples, self.seed = num_samples, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start (as for DistributedSampler)."""
        self.epoch = epoch

    def resume_at(self, samples_done: int) -> None:
        """Skip this rank's first `samples_done` samples of the current epoch, once."""
        self._skip = max(0, samples_done)

    def order(self, epoch: int) -> list[int]:
        """Epoch `epoch`'s indices for this rank (equal share per rank, the tail dropped)."""
        g = torch.Generator().manual_seed(self.seed)
        for e in range(epoch + 1):
            torch.empty((), dtype=torch.int64).random_(generator=g)  # the DataLoader iterator's base seed
            perm = torch.randperm(self.num_samples, generator=g)
            if e < epoch:  # RandomSampler draws a second (empty-sliced) permutation at the epoch's end
                torch.randperm(self.num_samples, generator=g)
        perm = perm.tolist()
        per_rank = self.num_samples // self.num_replicas
        return perm[self.rank : per_rank * self.num_replicas : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return iter(self.order(self.epoch)[skip:])

    def __len__(self) -> int:
        return self.num_samples // self.num_replicas


def loader_options(trainer: Any, num_workers: int) -> dict[str, Any]:
    """DataLoader options that depend on where the batches go: pinned host memory when the trainer
    runs on a CUDA device (faster, asynchronous copies), workers kept alive between evaluations
    when there are any (task.num_workers; 0 = load in the main process, the CPU default)."""
    root = getattr(getattr(trainer, "strategy", None), "root_device", None)
    return {"num_workers": num_workers, "pin_memory": getattr(root, "type", "cpu") == "cuda",
            "persistent_workers": num_workers > 0}


def resumable_loader(dataset: Any, batch_size: int, seed: int, num_workers: int = 0, trainer: Any = None,
                     drop_last: bool = True, collate_fn: Any = None) -> DataLoader:
    """The shuffled training loader, positioned where `trainer` stands.

    Lightning asks for the training loader after restoring a checkpoint, so `trainer.global_step`
    is the resumed step: the batches of the current epoch before it are skipped. Under a
    distributed strategy each rank gets its share (set `use_distributed_sampler: false` in the
    trainer config so Lightning does not wrap this sampler again).
    """
    replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = ResumableRandomSampler(len(dataset), seed, replicas, rank)
    if trainer is not None and trainer.global_step > 0:
        batches_per_epoch = len(sampler) // batch_size if drop_last else -(-len(sampler) // batch_size)
        done = trainer.global_step * trainer.accumulate_grad_batches - trainer.current_epoch * batches_per_epoch
        sampler.set_epoch(trainer.current_epoch)
        sampler.resume_at(max(0, done) * batch_size)
    # the generator only feeds the (unused without workers) worker base seed: drawing it from
    # the global RNG instead would shift dropout's random stream
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(seed), **loader_options(trainer, num_workers))
