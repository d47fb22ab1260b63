"""The token-id memory bank of QuantGPT's contrastive loss.

M has one row per vocabulary id holding a momentum average of the student's representation of
that token. The loss uses q_i = m * M[t_i] + (1 - m) * h^S_i (gradient through h^S_i only), and
after the optimizer step the rows are set to stopgrad(q_i): once per step, so with gradient
accumulation the micro-batches of a step all query the bank of the step's start and their updates
are written together after it (MemoryBankCallback queues them). Rows start empty and are filled
lazily from the first representation seen (so q_i = h^S_i the first time a token appears).

The bank is a plain nn.Module with buffers so that its state is a state_dict; ownership (when
it is created, updated, gathered across ranks and checkpointed) belongs to
`qgplm.train.callbacks.MemoryBankCallback`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MemoryBank(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, momentum: float = 0.5):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"memory bank momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("bank", torch.zeros(vocab_size, hidden_size))
        self.register_buffer("filled", torch.zeros(vocab_size, dtype=torch.bool))

    def query(self, student_hidden: Tensor, token_ids: Tensor) -> Tensor:
        """q = m * M[t] + (1 - m) * h for filled rows, h itself for rows never seen.

        In the bank's dtype (fp32), whatever the hidden states' (bf16 under bf16-mixed): the
        momentum average is kept at full precision, and the gradient reaches h through the cast."""
        h = student_hidden.to(self.bank.dtype)
        rows = self.bank[token_ids]
        filled = self.filled[token_ids].unsqueeze(-1)
        mixed = self.momentum * rows + (1.0 - self.momentum) * h
        return torch.where(filled, mixed, h)

    @torch.no_grad()
    def update(self, token_ids: Tensor, queries: Tensor, mask: Tensor | None = None) -> None:
        """Set M[t] <- stopgrad(q) for every valid position.

        A token occurring several times in the batch gets the mean of its queries, so the
        result does not depend on scatter order (deterministic, and identical on every rank
        once the inputs are gathered).

        No host sync (it runs after every training step): instead of selecting the valid positions
        and `unique` (both data-dependent shapes, a GPU sync each), positions are grouped by id
        with a stable sort, every group's valid queries summed and counted, and each position
        writes back its group's mean, or the row it already had when its id has no valid position:
        duplicates of an id write the same value, so the scatter order does not matter.
        """
        ids = token_ids.reshape(-1)
        q = queries.detach().reshape(ids.numel(), queries.shape[-1]).to(self.bank.dtype)
        keep = (torch.ones_like(ids, dtype=torch.bool) if mask is None
                else mask.reshape(-1).to(device=ids.device, dtype=torch.bool))
        sorted_ids, order = ids.sort(stable=True)
        starts = torch.ones_like(sorted_ids, dtype=torch.bool)
        starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
        group = torch.empty_like(order).scatter_(0, order, starts.cumsum(0) - 1)  # group of each position
        sums = torch.zeros_like(q).index_add_(0, group, q.masked_fill(~keep.unsqueeze(-1), 0.0))
        counts = torch.zeros(ids.numel(), device=q.device, dtype=q.dtype).index_add_(0, group, keep.to(q.dtype))
        seen = counts[group] > 0  # the position's id has a valid position in the batch
        mean = sums[group] / counts[group].clamp_min(1.0).unsqueeze(-1)
        self.bank.index_put_((ids,), torch.where(seen.unsqueeze(-1), mean, self.bank[ids]))
        self.filled.index_put_((ids,), self.filled[ids] | seen)

    def extra_repr(self) -> str:
        return f"vocab={self.bank.shape[0]}, hidden={self.bank.shape[1]}, momentum={self.momentum}"
