"""Distillation losses (docs/method.md): soft cross-entropy on logits and token-level contrast."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_cross_entropy(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0
) -> Tensor:
    """Per-token soft cross-entropy -sum_v p_T(v) log p_S(v), averaged over unmasked tokens.

    logits: [..., vocab]; mask: [...] (1 = keep). Computed in fp32 for stability under bf16.
    """
    t = temperature
    with torch.autocast(student_logits.device.type, enabled=False):
        return _soft_cross_entropy_fp32(student_logits, teacher_logits, mask, t)


def _soft_cross_entropy_fp32(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None, t: float) -> Tensor:
    per_token = _SoftCrossEntropy.apply(student_logits.float(), teacher_logits.float().detach(), t)
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


class _SoftCrossEntropy(torch.autograd.Function):
    """Per-token t^2 * (-sum_v p_T(v) log p_S(v)) over the last (vocabulary) dim, written out:

        forward   logsumexp(s / t) - <softmax(z_T / t), s / t>      (times t^2)
        backward  d/ds = t * (softmax(s / t) - p_T) * g

    The same value and gradient as the composed log_softmax / softmax / product / sum (tested in
    float64), in about half the passes over the [tokens, vocabulary] tensors, which are the
    largest of a distillation step (16 x 128 x 8192 floats in the CPU benchmark): no tensor the
    size of the logits is kept besides the teacher's probabilities. The teacher side gets no
    gradient (it is frozen)."""

    @staticmethod
    def forward(ctx, s: Tensor, z_t: Tensor, t: float) -> Tensor:
        s_t = s / t if t != 1.0 else s
        p_t = torch.softmax(z_t / t if t != 1.0 else z_t, dim=-1)
        ctx.save_for_backward(s_t, p_t)
        ctx.t = t
        return (torch.logsumexp(s_t, dim=-1) - torch.linalg.vecdot(p_t, s_t)) * (t * t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        s_t, p_t = ctx.saved_tensors
        return torch.softmax(s_t, dim=-1).sub_(p_t).mul_((grad * ctx.t).unsqueeze(-1)), None, None


def token_contrastive_loss(
    query: Tensor,
    teacher_hidden: Tensor,
    token_ids: Tensor,
    mask: Tensor | None = None,
    tau: float = 0.1,
    negatives: Tensor | None = None,
    negative_ids: Tensor | None = None,
) -> Tensor:
    """Token-level contrastive loss of QuantGPT (docs/method.md), averaged over valid tokens.

    For each sequence and valid position i: positive = the teacher's representation at i,
    negatives = the teacher's representations at the other valid positions j of the same sequence
    whose token id differs from t_i (positions holding the same token are masked out: they are not
    negatives of each other). Padding is excluded both as anchor and as negative.

        L = -(1/n) sum_i log( exp(cos(q_i, h_i)/tau) / sum_j exp(cos(q_i, h_j)/tau) )

    query: [B, L, H] (student side, usually from the memory bank), teacher_hidden: [B, L, H],
    token_ids: [B, L], mask: [B, L] (1 = real token).
    negatives / negative_ids: other negatives for the paper's ablations (the student's own
    representations, or random vocabulary embeddings with their ids); the positive stays the
    teacher's h_i. Default: the teacher's representations of the same sequence.
    """
    b, n, _ = query.shape
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=query.device)
    mask = mask.bool()
    # fp32 throughout, also under autocast (bf16-mixed): einsum would otherwise run as a bf16
    # matmul, and cos / tau (up to 1 / tau = 10) would carry bf16's 3 significant digits
    with torch.autocast(query.device.type, enabled=False):
        return _token_contrastive_fp32(query, teacher_hidden, token_ids, mask, tau, negatives, negative_ids)


def _token_contrastive_fp32(query: Tensor, teacher_hidden: Tensor, token_ids: Tensor, mask: Tensor, tau: float,
                            negatives: Tensor | None, negative_ids: Tensor | None) -> Tensor:
    n = query.shape[1]
    q = F.normalize(query.float(), dim=-1)
    k = F.normalize(teacher_hidden.float(), dim=-1)
    eye = torch.eye(n, dtype=torch.bool, device=query.device).unsqueeze(0)
    logits = torch.einsum("bih,bjh->bij", q, k) / tau  # [B, L, L]
    if negatives is not None:
        k_neg = F.normalize(negatives.float(), dim=-1)
        pos = logits.diagonal(dim1=-2, dim2=-1)
        logits = torch.einsum("bih,bjh->bij", q, k_neg) / tau
        logits = torch.where(eye, torch.diag_embed(pos), logits)
    neg_ids = token_ids if negative_ids is None else negative_ids
    same_token = token_ids.unsqueeze(-1) == neg_ids.unsqueeze(-2)
    allowed = mask.unsqueeze(-2) & (eye | ~same_token)  # valid key j, and j == i or a different token
    logits = logits.masked_fill(~allowed, float("-inf"))
    log_prob = logits.diagonal(dim1=-2, dim2=-1) - torch.logsumexp(logits, dim=-1)  # [B, L]
    valid = mask.to(log_prob.dtype)
    return -(log_prob.masked_fill(~mask, 0.0) * valid).sum() / valid.sum().clamp_min(1.0)
