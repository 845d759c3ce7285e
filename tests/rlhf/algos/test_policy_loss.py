"""Clipped surrogate loss on hand-worked ratios."""
import math

import pytest
import torch

from speechrl.rlhf.algos import POLICY_LOSSES
from speechrl.rlhf.algos.policy_loss import clipped_policy_loss

E = math.e


def _inputs(shift=1.0, adv=2.0):
    old = torch.log(torch.tensor([[0.5, 0.25, 0.1]]))
    logprobs = (old + shift).requires_grad_()  # ratio will be [e, e, e]
    return logprobs, old, torch.tensor([adv]), torch.ones(1, 3, dtype=torch.bool)


def test_positive_advantage_is_clipped_at_one_plus_eps():
    logprobs, old, adv, mask = _inputs(adv=2.0)
    loss, metrics = clipped_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.full((1, 3), -1.2 * 2.0))
    assert metrics["clip_fraction"].item() == 1.0
    assert metrics["ratio_mean"].item() == pytest.approx(E)
    assert metrics["ratio_max"].item() == pytest.approx(E)
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.zeros(1, 3))  # clipped tokens get no gradient


def test_negative_advantage_keeps_the_unclipped_ratio():
    # min(e * -2, 1.2 * -2) = -2e, so loss = 2e and the gradient -A * ratio = 2e flows.
    logprobs, old, adv, mask = _inputs(adv=-2.0)
    loss, metrics = clipped_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.full((1, 3), 2 * E))
    assert metrics["clip_fraction"].item() == 0.0
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.full((1, 3), 2 * E))


def test_clip_higher_uses_its_own_upper_bound():
    # ratio e^0.5 = 1.6487: clipped at 1.2 by clip_eps alone, inside [0.8, 2.0] with clip_eps_high=1.0.
    logprobs, old, adv, mask = _inputs(shift=0.5, adv=1.0)
    low, _ = clipped_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    high, metrics = clipped_policy_loss(logprobs, old, adv, mask, clip_eps=0.2, clip_eps_high=1.0)
    torch.testing.assert_close(low, torch.full((1, 3), -1.2))
    torch.testing.assert_close(high, torch.full((1, 3), -math.exp(0.5)))
    assert metrics["clip_fraction"].item() == 0.0


def test_lower_clip_bounds_a_shrinking_ratio_with_negative_advantage():
    # ratio e^-1 = 0.3679 < 0.8 and A = -1: min(-0.3679, -0.8) = -0.8 -> loss 0.8, clipped.
    logprobs, old, adv, mask = _inputs(shift=-1.0, adv=-1.0)
    loss, metrics = clipped_policy_loss(logprobs, old, adv, mask)
    torch.testing.assert_close(loss, torch.full((1, 3), 0.8))
    assert metrics["clip_fraction"].item() == 1.0


def test_masked_tokens_give_zero_loss_no_nan_grad_and_stay_out_of_metrics():
    logprobs = torch.tensor([[0.0, -1.0, float("-inf")], [0.0, 0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, -2.0, 0.0], [0.0, 0.0, 0.0]])  # ratios [1, e, pad], [1, pad, pad]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, metrics = clipped_policy_loss(logprobs, old, torch.tensor([1.0, 1.0]), mask)
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -1.2, 0.0], [-1.0, 0.0, 0.0]]))
    assert metrics["clip_fraction"].item() == pytest.approx(1 / 3)
    assert metrics["ratio_mean"].item() == pytest.approx((2 + E) / 3)
    assert metrics["ratio_max"].item() == pytest.approx(E)
    loss.sum().backward()
    assert torch.isfinite(logprobs.grad).all()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]))


def test_old_logprobs_and_advantages_get_no_gradient_and_are_not_modified():
    logprobs, old, adv, mask = _inputs(adv=-2.0)
    old = old.clone().requires_grad_()
    adv = adv.clone().requires_grad_()
    before = old.detach().clone()
    loss, _ = clipped_policy_loss(logprobs, old, adv, mask)
    loss.sum().backward()
    assert old.grad is None and adv.grad is None
    torch.testing.assert_close(old.detach(), before)
    assert POLICY_LOSSES.get("clipped") is clipped_policy_loss


def test_per_token_advantages_as_ppo_passes_them():
    # ratio e on every token; A = [2, -2, NaN on padding]: [-1.2 * 2 (clipped), 2e (unclipped), 0]
    logprobs, old, _, _ = _inputs()
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = clipped_policy_loss(logprobs, old, torch.tensor([[2.0, -2.0, float("nan")]]), mask)
    torch.testing.assert_close(loss, torch.tensor([[-2.4, 2 * E, 0.0]]))
    assert metrics["clip_fraction"].item() == 0.5
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 2 * E, 0.0]]))


def test_per_sequence_and_equal_per_token_advantages_agree():
    logprobs, old, adv, mask = _inputs(shift=0.1, adv=-1.5)
    per_seq, _ = clipped_policy_loss(logprobs, old, adv, mask)
    per_tok, _ = clipped_policy_loss(logprobs, old, adv[:, None].expand(1, 3), mask)
    torch.testing.assert_close(per_seq, per_tok)


def test_wrong_advantage_shape_is_named():
    logprobs, old, _, mask = _inputs()
    with pytest.raises(ValueError, match="advantages must be"):
        clipped_policy_loss(logprobs, old, torch.ones(1, 4), mask)
