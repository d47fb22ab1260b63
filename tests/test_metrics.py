"""The training runs' perplexity metric: torchmetrics' states and sums, a numerically stable NLL."""

import math

import pytest
import torch
from torchmetrics.text import Perplexity as TorchmetricsPerplexity

from qgplm.data.token_stream import IGNORE_INDEX
from qgplm.train.metrics import Perplexity


def test_equals_torchmetrics_on_ordinary_logits_with_ignored_targets():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11) * 3
    target = torch.randint(0, 11, (3, 7))
    target[0, :2] = IGNORE_INDEX
    ours, ref = Perplexity(ignore_index=IGNORE_INDEX), TorchmetricsPerplexity(ignore_index=IGNORE_INDEX)
    for m in (ours, ref):  # two updates: the states accumulate
        m.update(logits[:2], target[:2])
        m.update(logits[2:], target[2:])
    assert float(ours.count) == 19
    assert ours.compute().item() == pytest.approx(ref.compute().item(), rel=1e-5)


def test_finite_where_the_target_probability_underflows_fp32():
    # token 1: the target's logit is 200 below the row's largest, its probability exp(-200) underflows fp32;
    # token 2: a uniform row over 3 tokens. NLL = (200 + log(1 + e^-200 + ...)) and log 3, by hand.
    logits = torch.tensor([[[0.0, 200.0, 0.0], [1.0, 1.0, 1.0]]])
    target = torch.tensor([[0, 2]])
    expected = math.exp((200.0 + math.log(3.0)) / 2)
    ours = Perplexity(ignore_index=IGNORE_INDEX)
    ours.update(logits, target)
    assert ours.compute().item() == pytest.approx(expected, rel=1e-5)
    ref = TorchmetricsPerplexity(ignore_index=IGNORE_INDEX)
    ref.update(logits, target)
    assert math.isinf(ref.compute().item())  # why qgplm does not use torchmetrics' update


def test_bf16_logits_are_scored_in_fp32_and_shapes_are_checked():
    logits = torch.randn(2, 5, 9)
    target = torch.randint(0, 9, (2, 5))
    a, b = Perplexity(), Perplexity()
    a.update(logits.bfloat16(), target)
    b.update(logits.bfloat16().float(), target)
    assert a.compute().item() == b.compute().item()
    with pytest.raises(ValueError, match="vocabulary dim"):
        a.update(logits, target[:, :4])
