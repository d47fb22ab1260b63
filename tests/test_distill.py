"""Distillation losses and the memory bank, against hand-computed values."""

import math

import pytest
import torch

from qgplm.distill import MemoryBank, soft_cross_entropy, token_contrastive_loss

# One sequence of 3 tokens, hidden size 2 (see the derivations in each test).
Q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
HT = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
# cos(q_i, h_j):  i=0: [1, 0, -1]   i=1: [0, 1, 0]   i=2: [r, r, -r] with r = 1/sqrt(2)


def test_contrastive_hand_computed():
    # l_i = -cos(q_i,h_i)/tau + log sum_j exp(cos(q_i,h_j)/tau), tau = 1:
    # l0 = -1 + log(e + 1 + 1/e); l1 = -1 + log(2 + e); l2 = r + log(2 e^r + e^-r); mean = 1.06037684627
    loss = token_contrastive_loss(Q, HT, torch.tensor([[5, 6, 7]]), tau=1.0)
    assert loss.item() == pytest.approx(1.0603768462728107, abs=1e-6)


def test_contrastive_temperature():
    # same with tau = 0.5: every cosine doubled before the softmax
    loss = token_contrastive_loss(Q, HT, torch.tensor([[5, 6, 7]]), tau=0.5)
    assert loss.item() == pytest.approx(1.3110584348028376, abs=1e-6)


def test_contrastive_masks_repeated_tokens():
    # ids 5,6,5: position 2 is not a negative of position 0, nor 0 of 2
    # l0 = -1 + log(e + 1); l1 unchanged; l2 = r + log(e^r + e^-r)
    loss = token_contrastive_loss(Q, HT, torch.tensor([[5, 6, 5]]), tau=1.0)
    assert loss.item() == pytest.approx(0.832180561801704, abs=1e-6)


def test_contrastive_masks_padding():
    # third position is padding: neither an anchor nor a negative
    # l0 = -1 + log(e + 1); l1 = -1 + log(1 + e)
    mask = torch.tensor([[1, 1, 0]])
    loss = token_contrastive_loss(Q, HT, torch.tensor([[5, 6, 7]]), mask, tau=1.0)
    assert loss.item() == pytest.approx(0.3132616875182228, abs=1e-6)


def test_contrastive_gradient_reaches_query_only_through_cosine():
    q = Q.clone().requires_grad_(True)
    h = HT.clone().requires_grad_(True)
    token_contrastive_loss(q, h, torch.tensor([[5, 6, 7]])).backward()
    assert q.grad.abs().sum() > 0 and h.grad.abs().sum() > 0
    # scaling q does not change cosines: gradient orthogonal to q
    assert torch.allclose((q.grad * q).sum(-1), torch.zeros(1, 3), atol=1e-6)


def test_contrastive_batch_is_per_sequence():
    # negatives come from the same sequence only: a batch of two equals the mean of each alone
    q2 = torch.cat([Q, Q.flip(1)])
    h2 = torch.cat([HT, HT.flip(1)])
    ids = torch.tensor([[5, 6, 7], [7, 6, 5]])
    both = token_contrastive_loss(q2, h2, ids)
    a = token_contrastive_loss(q2[:1], h2[:1], ids[:1])
    b = token_contrastive_loss(q2[1:], h2[1:], ids[1:])
    assert both.item() == pytest.approx(((a + b) / 2).item(), abs=1e-6)


def test_soft_cross_entropy_hand_computed():
    # teacher p = softmax([0, ln 3]) = [1/4, 3/4]; student logits [0, 0] -> log q = [-ln 2, -ln 2]
    # H(p, q) = ln 2 for the first token; second token masked out
    s = torch.zeros(1, 2, 2)
    t = torch.tensor([[[0.0, math.log(3)], [5.0, -5.0]]])
    loss = soft_cross_entropy(s, t, torch.tensor([[1, 0]]))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    # equal distributions: soft CE = entropy of the teacher
    ent = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert soft_cross_entropy(t[:, :1], t[:, :1]).item() == pytest.approx(ent, abs=1e-6)


def test_soft_cross_entropy_temperature_scaling():
    # T^2 * H(softmax(t/T), softmax(s/T)) with T = 2, t=[0, 2 ln 3] -> p=[1/4, 3/4], s=0 -> ln 2 * 4
    t = torch.tensor([[[0.0, 2 * math.log(3)]]])
    got = soft_cross_entropy(torch.zeros(1, 1, 2), t, temperature=2.0).item()
    assert got == pytest.approx(4 * math.log(2), abs=1e-6)


def test_soft_cross_entropy_gradient_hand_computed():
    # d/ds of T^2 H(p_T, softmax(s/T)) = T (softmax(s/T) - p_T): s = 0 -> q = [1/2, 1/2], p = [1/4, 3/4]
    for temp, t in ((1.0, [0.0, math.log(3)]), (2.0, [0.0, 2 * math.log(3)])):
        s = torch.zeros(1, 1, 2, requires_grad=True)
        soft_cross_entropy(s, torch.tensor([[t]]), temperature=temp).backward()
        assert s.grad.flatten().tolist() == pytest.approx([temp * 0.25, -temp * 0.25], abs=1e-6)


@pytest.mark.parametrize("temp", [1.0, 2.0, 0.5])
def test_soft_cross_entropy_equals_the_composed_formula(temp):
    """The fused forward/backward (losses._SoftCrossEntropy) against autograd through
    log_softmax / softmax / product / sum, in float64: value and gradient, with a mask."""
    from qgplm.distill.losses import _SoftCrossEntropy

    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(2, 5, 11, generator=g, dtype=torch.float64)).requires_grad_()
    t = 3 * torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    w = torch.rand(2, 5, generator=g, dtype=torch.float64)
    ref = (-(torch.softmax(t / temp, -1) * torch.log_softmax(s / temp, -1)).sum(-1) * temp**2 * w).sum()
    (ref_grad,) = torch.autograd.grad(ref, s)
    got = (_SoftCrossEntropy.apply(s, t, temp) * w).sum()
    (got_grad,) = torch.autograd.grad(got, s)
    assert torch.allclose(got, ref, atol=1e-12, rtol=0) and torch.allclose(got_grad, ref_grad, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda x: _SoftCrossEntropy.apply(x, t, temp), (s,))


def test_memory_bank_lazy_init_and_momentum():
    bank = MemoryBank(vocab_size=10, hidden_size=2, momentum=0.5)
    ids = torch.tensor([[3, 4]])
    h1 = torch.tensor([[[2.0, 0.0], [0.0, 4.0]]])
    q = bank.query(h1, ids)
    assert torch.equal(q, h1)  # empty rows: q = h
    bank.update(ids, q)
    h2 = torch.tensor([[[0.0, 2.0], [4.0, 0.0]]])
    q2 = bank.query(h2, ids)
    # q = 0.5 * M[t] + 0.5 * h
    assert torch.allclose(q2, torch.tensor([[[1.0, 1.0], [2.0, 2.0]]]))
    bank.update(ids, q2)
    assert torch.allclose(bank.bank[3], torch.tensor([1.0, 1.0]))
    assert bank.filled.tolist() == [False] * 3 + [True, True] + [False] * 5


def test_memory_bank_query_gradient_scaled_by_one_minus_momentum():
    bank = MemoryBank(5, 2, momentum=0.75)
    ids = torch.tensor([[1]])
    bank.update(ids, torch.ones(1, 1, 2))
    h = torch.zeros(1, 1, 2, requires_grad=True)
    bank.query(h, ids).sum().backward()
    assert torch.allclose(h.grad, torch.full((1, 1, 2), 0.25))


def test_memory_bank_duplicates_averaged_and_mask_respected():
    bank = MemoryBank(5, 1, momentum=0.5)
    ids = torch.tensor([[2, 2, 3]])
    q = torch.tensor([[[1.0], [3.0], [7.0]]])
    bank.update(ids, q, mask=torch.tensor([[1, 1, 0]]))
    assert bank.bank[2].item() == pytest.approx(2.0)  # mean of the two occurrences
    assert not bool(bank.filled[3])  # masked position not written


def test_memory_bank_update_matches_the_per_id_mean_with_mask_and_duplicates():
    """The sync-free update (stable sort + index_add_) against the rule written out per id: rows of
    ids with a valid position get the mean of its queries, every other row (masked-only ids, unseen
    ids, NaN in a masked query) is left as it was."""
    g = torch.Generator().manual_seed(0)
    bank = MemoryBank(12, 4)
    bank.update(torch.tensor([[0, 1, 2]]), torch.randn(1, 3, 4, generator=g))  # some rows filled before
    before, filled = bank.bank.clone(), bank.filled.clone()
    ids = torch.randint(0, 8, (3, 10), generator=g)
    q = torch.randn(3, 10, 4, generator=g)
    mask = torch.rand(3, 10, generator=g) > 0.3
    q[~mask] = float("nan")  # a pad position's garbage never reaches the bank
    bank.update(ids, q, mask)
    for t in range(12):
        rows = q[(ids == t) & mask]
        if len(rows):
            assert torch.allclose(bank.bank[t], rows.mean(0), atol=1e-6) and bool(bank.filled[t])
        else:
            assert torch.equal(bank.bank[t], before[t]) and bool(bank.filled[t]) == bool(filled[t])
    empty = MemoryBank(5, 2)
    empty.update(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 2))  # nothing to write
    empty.update(torch.tensor([[1, 2]]), torch.ones(1, 2, 2), mask=torch.zeros(1, 2))
    assert not empty.filled.any() and not empty.bank.any()


def test_memory_bank_state_dict_round_trip():
    bank = MemoryBank(6, 3)
    bank.update(torch.tensor([[1, 5]]), torch.randn(1, 2, 3))
    other = MemoryBank(6, 3)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.bank, bank.bank) and torch.equal(other.filled, bank.filled)


def test_contrastive_student_negatives_replace_off_diagonal_keys():
    # negatives N: the positive stays cos(q_i, h_i); off-diagonal keys are N_j.
    # With N = HT the loss is unchanged; with N = Q (q's own states) by hand, tau = 1:
    # cos(q_i, q_j): i=0: [., 0, r]  i=1: [0, ., r]  i=2: [r, r, .]; positives 1, 1, -r
    # l0 = -1 + log(e + 1 + e^r); l1 = -1 + log(1 + e + e^r); l2 = r + log(2 e^r + e^-r)
    ids = torch.tensor([[5, 6, 7]])
    base = token_contrastive_loss(Q, HT, ids, tau=1.0)
    assert token_contrastive_loss(Q, HT, ids, tau=1.0, negatives=HT).item() == pytest.approx(base.item(), abs=1e-6)
    r = 1 / math.sqrt(2)
    e = math.exp
    expect = ((-1 + math.log(e(1) + 1 + e(r))) * 2 + r + math.log(2 * e(r) + e(-r))) / 3
    assert token_contrastive_loss(Q, HT, ids, tau=1.0, negatives=Q).item() == pytest.approx(expect, abs=1e-6)


def test_contrastive_random_negatives_mask_by_their_own_ids():
    # random negatives whose id equals the anchor's token are masked out: all three equal -> only positives
    ids = torch.tensor([[5, 6, 7]])
    loss = token_contrastive_loss(Q, HT, ids, tau=1.0, negatives=torch.randn(1, 3, 2),
                                  negative_ids=torch.tensor([[5, 5, 5]]))
    # anchor 0 (id 5): every negative has id 5 -> only itself -> loss 0; anchors 1, 2 keep some negatives
    l0 = token_contrastive_loss(Q[:, :1], HT[:, :1], ids[:, :1], tau=1.0)
    assert l0.item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() > 0


def test_disable_dropout_covers_functional_dropout():
    """BART passes float rates to nn.functional.dropout (no nn.Dropout module): a train-mode
    forward of the student must still be deterministic once dropout is disabled."""
    from transformers import BartConfig, BartForConditionalGeneration

    from qgplm.train.module import disable_dropout

    torch.manual_seed(0)
    bart = BartForConditionalGeneration(BartConfig(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=50, max_position_embeddings=32, dropout=0.5,
        activation_dropout=0.5, attention_dropout=0.5)).train()
    ids = torch.randint(3, 50, (2, 8))
    assert not torch.equal(bart(input_ids=ids).logits, bart(input_ids=ids).logits)  # dropout active
    disable_dropout(bart)
    assert torch.equal(bart(input_ids=ids).logits, bart(input_ids=ids).logits)
