"""The token-id memory bank of QuantGPT's contrastive loss.

M has one row per vocabulary id holding a momentum average of the student's representation of
that token. The loss uses q_i = m * M[t_i] + (1 - m) * h^S_i (gradient through h^S_i only), and
after the optimizer step the rows are set to stopgrad(q_i): once per step, so with gradient
accumulation the micro-batches of a step all query the bank of the step's start and their updates
are written together after it (MemoryBankCallback queues them). Rows start empty and are filled
lazily from the first representation seen (so q_i = h^S_i the first time a token appears).

The bank is a plain nn.Module with buffers so that its state is a state_dict; ownership (when
it is created, updated, gathered across ranks and checkpointed) belongs to
`qgplm.callbacks.MemoryBankCallback`.
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
        """
        ids = token_ids.reshape(-1)
        q = queries.detach().reshape(ids.numel(), -1).to(self.bank.dtype)
        if mask is not None:
            keep = mask.reshape(-1).bool()
            ids, q = ids[keep], q[keep]
        if ids.numel() == 0:
            return
        uniq, inverse = ids.unique(return_inverse=True)  # sorted ids: deterministic
        sums = torch.zeros(uniq.numel(), q.shape[1], device=q.device, dtype=q.dtype).index_add_(0, inverse, q)
        counts = torch.bincount(inverse, minlength=uniq.numel()).to(q.dtype).unsqueeze(-1)
        self.bank[uniq] = sums / counts
        self.filled[uniq] = True

    def extra_repr(self) -> str:
        return f"vocab={self.bank.shape[0]}, hidden={self.bank.shape[1]}, momentum={self.momentum}"
