"""PPO with a critic: GAE, whitening, clipped value loss, KL in the reward and its controllers."""
import math

import pytest
import torch

from speechrl.rlhf.algos import LOSS_AGGREGATIONS
from speechrl.rlhf.algos.gae import gae_advantages, masked_whiten
from speechrl.rlhf.algos.kl_reward import AdaptiveKLController, FixedKLController, kl_penalized_rewards
from speechrl.rlhf.algos.value_loss import clipped_value_loss

NAN = float("nan")
LN2 = math.log(2)


def _random(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# ---- GAE ----

def test_gae_hand_worked_three_tokens():
    # gamma = 0.9, lam = 0.8 (gamma * lam = 0.72); r = [-0.1, 0, 1], V = [0.5, 0.6, 0.7], V_3 = 0:
    # delta_2 = 1 - 0.7 = 0.3                     A_2 = 0.3
    # delta_1 = 0 + 0.9 * 0.7 - 0.6 = 0.03        A_1 = 0.03 + 0.72 * 0.3 = 0.246
    # delta_0 = -0.1 + 0.9 * 0.6 - 0.5 = -0.06    A_0 = -0.06 + 0.72 * 0.246 = 0.11712
    # returns = A + V = [0.61712, 0.846, 1.0]
    rewards, values = torch.tensor([[-0.1, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.11712, 0.246, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.61712, 0.846, 1.0]]))


def test_lam_one_is_discounted_return_minus_value():
    rewards, values = _random((2, 6), seed=0)
    adv, ret = gae_advantages(rewards, values, torch.ones(2, 6), gamma=0.9, lam=1.0)
    # Monte Carlo: G_t = sum_k 0.9^k r_{t+k}, written out as a double loop
    mc = torch.tensor([[sum(0.9 ** (k - t) * rewards[b, k].item() for k in range(t, 6)) for t in range(6)]
                       for b in range(2)])
    torch.testing.assert_close(ret, mc)
    torch.testing.assert_close(adv, mc - values)


def test_lam_zero_is_the_td_error():
    rewards, values = _random((2, 5), seed=1)
    adv, ret = gae_advantages(rewards, values, torch.ones(2, 5), gamma=0.9, lam=0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(2, 1)], dim=1)
    torch.testing.assert_close(adv, rewards + 0.9 * next_values - values)
    torch.testing.assert_close(ret, rewards + 0.9 * next_values)


def test_two_lengths_in_one_batch_equal_each_alone():
    # Row 0 has 3 valid tokens, row 1 has 5; NaN padding must neither leak nor contribute.
    r, v = _random((2, 6), seed=2)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    adv, ret = gae_advantages(r.masked_fill(~mask, NAN), v.masked_fill(~mask, NAN), mask, gamma=0.95, lam=0.9)
    for row, n in ((0, 3), (1, 5)):
        alone_adv, alone_ret = gae_advantages(r[row:row + 1, :n], v[row:row + 1, :n], torch.ones(1, n), 0.95, 0.9)
        torch.testing.assert_close(adv[row:row + 1, :n], alone_adv)
        torch.testing.assert_close(ret[row:row + 1, :n], alone_ret)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_a_gap_in_the_mask_is_skipped_as_if_absent():
    r, v = _random((1, 3), seed=3)
    adv, _ = gae_advantages(r, v, torch.tensor([[1, 0, 1]]), gamma=0.9, lam=0.8)
    packed, _ = gae_advantages(r[:, [0, 2]], v[:, [0, 2]], torch.ones(1, 2), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv[:, [0, 2]], packed)
    assert adv[0, 1] == 0


def test_gae_output_is_detached_and_inputs_unchanged():
    values = torch.tensor([[0.5, 0.6]], requires_grad=True)
    rewards = torch.tensor([[0.0, 1.0]])
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 2))
    assert not adv.requires_grad and not ret.requires_grad
    torch.testing.assert_close(values.detach(), torch.tensor([[0.5, 0.6]]))


def test_gae_shape_and_range_errors_are_named():
    with pytest.raises(ValueError, match="rewards, values and mask"):
        gae_advantages(torch.zeros(1, 3), torch.zeros(1, 2), torch.ones(1, 3))
    with pytest.raises(ValueError, match="lam=1.5"):
        gae_advantages(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3), lam=1.5)


# ---- whitening ----

def test_masked_whiten_uses_valid_tokens_only():
    # valid values [1, 3, 3, 1]: mean 2, population var 1 -> [-1, 1, 1, -1]; padding (99, NaN) -> 0
    x = torch.tensor([[1.0, 3.0, 99.0], [3.0, 1.0, NAN]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor([[-1.0, 1.0, 0.0], [1.0, -1.0, 0.0]]))


def test_gae_whiten_standardizes_advantages_but_not_returns():
    r, v = _random((2, 5), seed=4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    raw_adv, raw_ret = gae_advantages(r, v, mask, gamma=0.9, lam=0.8)
    adv, ret = gae_advantages(r, v, mask, gamma=0.9, lam=0.8, whiten=True)
    torch.testing.assert_close(ret, raw_ret)
    torch.testing.assert_close(adv, masked_whiten(raw_adv, mask))
    assert adv[mask].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert adv[mask].var(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert (adv[~mask] == 0).all()


# ---- clipped value loss ----

def _value_case(v):
    # old V = 0, return R = 1, clip_range 0.2: V is clipped into [-0.2, 0.2]
    values = torch.tensor([[v]], requires_grad=True)
    return values, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1)


def test_value_inside_the_clip_range_is_plain_squared_error():
    # V = 0.1: 0.5 * (0.1 - 1)^2 = 0.405, gradient V - R = -0.9
    values, old, ret, mask = _value_case(0.1)
    loss, metrics = clipped_value_loss(values, old, ret, mask, clip_range=0.2)
    torch.testing.assert_close(loss, torch.tensor([[0.405]]))
    assert metrics["value_clip_fraction"].item() == 0.0
    loss.sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([[-0.9]]))


def test_value_past_the_range_toward_the_return_gets_no_gradient():
    # V = 0.5: unclipped (0.5)^2 = 0.25, clipped V 0.2 -> (0.8)^2 = 0.64; max 0.64 -> loss 0.32, constant
    values, old, ret, mask = _value_case(0.5)
    loss, metrics = clipped_value_loss(values, old, ret, mask, clip_range=0.2)
    torch.testing.assert_close(loss, torch.tensor([[0.32]]))
    assert metrics["value_clip_fraction"].item() == 1.0
    assert metrics["value_mse"].item() == pytest.approx(0.25)
    loss.sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0]]))


def test_value_past_the_range_away_from_the_return_is_still_corrected():
    # V = -0.5: unclipped (1.5)^2 = 2.25 > clipped (-0.2 - 1)^2 = 1.44 -> loss 1.125, gradient -1.5
    values, old, ret, mask = _value_case(-0.5)
    loss, metrics = clipped_value_loss(values, old, ret, mask, clip_range=0.2)
    torch.testing.assert_close(loss, torch.tensor([[1.125]]))
    assert metrics["value_clip_fraction"].item() == 0.0
    loss.sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([[-1.5]]))


def test_no_clip_range_is_half_squared_error():
    values, old, ret, mask = _value_case(0.5)
    loss, _ = clipped_value_loss(values, old, ret, mask, clip_range=None)
    torch.testing.assert_close(loss, torch.tensor([[0.125]]))


@pytest.mark.parametrize("name", LOSS_AGGREGATIONS.names())
def test_value_loss_aggregates_like_policy_losses_and_ignores_nan_padding(name):
    # the three cases above in one row, then a padded row: per-token [0.405, 0.32, 1.125], [0.405, pad, pad]
    values = torch.tensor([[0.1, 0.5, -0.5], [0.1, NAN, NAN]], requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 1.0], [1.0, NAN, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    per_token, metrics = clipped_value_loss(values, torch.zeros(2, 3), returns, mask)
    torch.testing.assert_close(per_token, torch.tensor([[0.405, 0.32, 1.125], [0.405, 0.0, 0.0]]))
    assert metrics["value_clip_fraction"].item() == pytest.approx(1 / 4)
    loss = LOSS_AGGREGATIONS.get(name)(per_token, mask)
    expected = LOSS_AGGREGATIONS.get(name)(torch.tensor([[0.405, 0.32, 1.125], [0.405, 0.0, 0.0]]), mask)
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert torch.isfinite(values.grad).all() and (values.grad[mask == 0] == 0).all()


# ---- KL in the reward ----

def test_score_goes_on_the_last_valid_token_and_kl_on_every_token():
    # pi = 0.5 everywhere, ref = [0.25, 0.5, 1.0]: k1 = log pi - log ref = [ln2, 0, -ln2]
    logprobs = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 1.0], [0.25, 0.5, 1.0], [0.25, 0.5, 1.0]]))
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # lengths 3, 1 and an empty row
    scores = torch.tensor([2.0, 5.0, 7.0])
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[LN2, 0.0, -LN2], [LN2, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.1 * LN2, 0.0, 0.1 * LN2 + 2.0],
                                                      [-0.1 * LN2 + 5.0, 0.0, 0.0],
                                                      [0.0, 0.0, 0.0]]))


def test_kl_estimator_is_looked_up_by_name():
    logprobs, ref = torch.zeros(1, 2), torch.full((1, 2), -LN2)  # pi = 1, ref = 0.5: k3 = 0.5 - 1 + ln2
    _, kl = kl_penalized_rewards(torch.zeros(1), logprobs, ref, torch.ones(1, 2), kl_coef=1.0, kl_estimator="k3")
    torch.testing.assert_close(kl, torch.full((1, 2), 0.5 - 1 + LN2))
    with pytest.raises(KeyError, match="k3"):
        kl_penalized_rewards(torch.zeros(1), logprobs, ref, torch.ones(1, 2), kl_coef=1.0, kl_estimator="k9")


def test_failed_score_with_tokens_is_an_error_but_on_an_empty_row_is_ignored():
    lp = torch.zeros(2, 2)
    rewards, _ = kl_penalized_rewards(torch.tensor([1.0, NAN]), lp, lp, torch.tensor([[1, 0], [0, 0]]), 0.1)
    torch.testing.assert_close(rewards, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"\[1\]"):
        kl_penalized_rewards(torch.tensor([1.0, NAN]), lp, lp, torch.ones(2, 2), 0.1)


def test_without_kl_and_critic_lam_one_gives_the_score_on_every_token():
    # beta = 0, V = 0, gamma = lam = 1: every valid token's advantage is its sequence's score
    lp = torch.zeros(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    rewards, _ = kl_penalized_rewards(torch.tensor([3.0, -1.0]), lp, lp, mask, kl_coef=0.0)
    adv, _ = gae_advantages(rewards, torch.zeros(2, 4), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[3.0, 3.0, 3.0, 0.0], [-1.0, -1.0, 0.0, 0.0]]))


# ---- KL controllers ----

def test_adaptive_controller_raises_beta_above_target_and_lowers_it_below():
    # target 6, horizon 10000, 1000 samples: factor 1 + e * 0.1
    up = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=10000)
    assert up.update(kl=6.6, n_steps=1000) == pytest.approx(0.1 * 1.01)  # e = 0.1
    down = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=10000)
    assert down.update(kl=5.4, n_steps=1000) == pytest.approx(0.1 * 0.99)  # e = -0.1
    on_target = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=10000)
    assert on_target.update(kl=6.0, n_steps=1000) == pytest.approx(0.1)


def test_adaptive_controller_step_is_bounded_by_the_error_clip():
    # e is clipped to +-0.2: a KL of 1e9 or 0 moves beta by the factor 1.02 / 0.98 only
    high = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=10000)
    assert high.update(kl=1e9, n_steps=1000) == pytest.approx(0.1 * 1.02)
    low = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=10000)
    for _ in range(100):
        low.update(kl=0.0, n_steps=1000)
    assert low.kl_coef == pytest.approx(0.1 * 0.98**100) and low.kl_coef > 0
    with pytest.raises(ValueError, match="n_steps"):
        low.update(kl=0.0, n_steps=50000)


def test_controllers_resume_from_state_dict():
    ctl = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(kl=12.0, n_steps=1000)
    resumed = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.kl_coef == ctl.kl_coef == pytest.approx(0.102)
    assert resumed.update(kl=12.0, n_steps=1000) == ctl.update(kl=12.0, n_steps=1000)

    fixed = FixedKLController(0.05)
    assert fixed.update(kl=100.0, n_steps=1000) == 0.05
    again = FixedKLController(0.0)
    again.load_state_dict(fixed.state_dict())
    assert again.kl_coef == 0.05
