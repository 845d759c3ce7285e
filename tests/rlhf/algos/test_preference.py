"""DPO (sigmoid), IPO and the SFT term on hand-worked values."""
import math

import pytest
import torch

from speechrl.rlhf.algos import PREFERENCE_LOSSES
from speechrl.rlhf.algos.preference import ipo_loss, sft_term, sigmoid_loss


def _pair(chosen, rejected, ref_chosen=-2.0, ref_rejected=-2.0):
    c = torch.tensor([chosen], requires_grad=True)
    r = torch.tensor([rejected], requires_grad=True)
    return c, r, torch.tensor([ref_chosen], requires_grad=True), torch.tensor([ref_rejected], requires_grad=True)


def test_sigmoid_hand_values_and_gradients():
    # margin = (-1 - -2) - (-3 - -2) = 2, h = beta * margin = 1: loss = -log sigmoid(1) = log(1 + e^-1)
    c, r, rc, rr = _pair(-1.0, -3.0)
    loss, m = sigmoid_loss(c, r, rc, rr, beta=0.5)
    torch.testing.assert_close(loss, torch.tensor([math.log(1 + math.exp(-1))]))
    loss.sum().backward()
    # d/d chosen = -beta * sigmoid(-h) = -0.5 * 0.268941; the rejected side mirrors it
    torch.testing.assert_close(c.grad, torch.tensor([-0.5 / (1 + math.e)]))
    torch.testing.assert_close(r.grad, torch.tensor([0.5 / (1 + math.e)]))
    assert rc.grad is None and rr.grad is None, "the reference is a constant"
    assert (float(m["reward_chosen"]), float(m["reward_rejected"])) == (0.5, -0.5)
    assert float(m["reward_margin"]) == 1.0 and float(m["reward_accuracy"]) == 1.0


def test_sigmoid_label_smoothing_and_no_preference():
    c, r, rc, rr = _pair(-1.0, -3.0)
    smoothed, _ = sigmoid_loss(c, r, rc, rr, beta=0.5, label_smoothing=0.1)
    # 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1)
    torch.testing.assert_close(smoothed, torch.tensor([0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.e)]))
    even, m = sigmoid_loss(*_pair(-2.0, -2.0))
    torch.testing.assert_close(even, torch.tensor([math.log(2)]))
    assert float(m["reward_accuracy"]) == 0.0  # a tie is not a win


def test_ipo_regresses_the_margin_to_half_inverse_beta():
    # beta 0.5: target margin 1; margin 2 -> (2 - 1)^2 = 1; beta 0.25: target 2 -> 0
    torch.testing.assert_close(ipo_loss(*_pair(-1.0, -3.0), beta=0.5)[0], torch.tensor([1.0]))
    torch.testing.assert_close(ipo_loss(*_pair(-1.0, -3.0), beta=0.25)[0], torch.tensor([0.0]))
    # past the target IPO pulls back, unlike DPO: d/d chosen = 2 * (margin - target) > 0
    c, r, rc, rr = _pair(0.0, -4.0)  # margin 4, target 1
    ipo_loss(c, r, rc, rr, beta=0.5)[0].sum().backward()
    torch.testing.assert_close(c.grad, torch.tensor([6.0]))


def test_sft_term_is_the_masked_mean_nll():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(sft_term(logp, mask), torch.tensor([1.5, 0.5]))


def test_registered_and_bad_arguments_named():
    assert PREFERENCE_LOSSES.get("sigmoid") is sigmoid_loss and PREFERENCE_LOSSES.get("ipo") is ipo_loss
    with pytest.raises(ValueError, match="beta=0"):
        sigmoid_loss(*_pair(-1.0, -3.0), beta=0)
    with pytest.raises(ValueError, match="label_smoothing=0.1"):
        ipo_loss(*_pair(-1.0, -3.0), label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"\[B\] of one shape"):
        sigmoid_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))
