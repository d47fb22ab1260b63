"""Diagnostics of the distilled representations (docs/method.md, "Token-level contrastive loss and memory bank").

`token_homogeneity`: the mean pairwise cosine similarity of token representations. The paper's
motivation for the contrastive loss is that quantized models' token representations collapse
towards each other ("homogeneous word embeddings"); logging this for teacher and student shows
whether the student's representations stay as distinguishable as the teacher's.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def token_homogeneity(hidden: Tensor, mask: Tensor, max_tokens: int = 1024) -> Tensor:
    """Mean cosine similarity over all pairs of distinct tokens among the (first `max_tokens`)
    positions where `mask` is true. hidden: [B, T, H], mask: [B, T]."""
    h = hidden[mask.bool()].float()[:max_tokens]
    n = h.shape[0]
    if n < 2:
        return torch.tensor(float("nan"), device=hidden.device)
    h = torch.nn.functional.normalize(h, dim=-1)
    total = (h.sum(0) ** 2).sum()  # sum over all ordered pairs (i, j) of cos, incl. i == j
    return (total - n) / (n * (n - 1))
