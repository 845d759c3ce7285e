"""GRPO advantages on hand-worked groups."""
import math

import pytest
import torch

from speechrl.rlhf.algos import ADVANTAGES
from speechrl.rlhf.algos.grpo_advantage import grpo_advantages

NAN = float("nan")
# Group [1, 2, 3]: mean 2, population std sqrt(2/3) = 0.8165, so advantages are -+1/0.8165 = -+1.2247.
Z = 1 / math.sqrt(2 / 3)


def _adv(rewards, groups, valid=None, **kw):
    valid = [True] * len(rewards) if valid is None else valid
    return grpo_advantages(torch.tensor(rewards), torch.tensor(groups), torch.tensor(valid), **kw)


def test_one_group_is_standardized_with_population_std():
    torch.testing.assert_close(_adv([1.0, 2.0, 3.0], [0, 0, 0]), torch.tensor([-Z, 0.0, Z]), atol=1e-5, rtol=0)


def test_without_std_normalization_only_the_mean_is_removed():
    torch.testing.assert_close(_adv([1.0, 2.0, 3.0], [0, 0, 0], std_normalize=False), torch.tensor([-1.0, 0.0, 1.0]))


def test_invalid_member_gets_zero_and_is_left_out_of_the_stats():
    # Without the NaN member the group is [1, 3]: mean 2, std 1 -> [-1, 0, 1].
    adv = _adv([1.0, NAN, 3.0], [0, 0, 0], [True, False, True])
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0]), atol=1e-5, rtol=0)


def test_groups_are_independent_and_ids_need_not_be_dense_or_sorted():
    # Group 7: [1, 2, 3] as above; group -4: [10, 30] -> mean 20, std 10 -> [-1, 1].
    adv = _adv([10.0, 1.0, 2.0, 30.0, 3.0], [-4, 7, 7, -4, 7])
    torch.testing.assert_close(adv, torch.tensor([-1.0, -Z, 0.0, 1.0, Z]), atol=1e-5, rtol=0)


def test_group_with_one_valid_member_gets_zero():
    adv = _adv([5.0, NAN, 1.0, 2.0], [0, 0, 1, 1], [True, False, True, True], std_normalize=False)
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, -0.5, 0.5]))


def test_unanimous_group_gets_zero_not_nan():
    torch.testing.assert_close(_adv([1.0, 1.0], [0, 0]), torch.zeros(2))


def test_nan_reward_marked_valid_is_an_error():
    with pytest.raises(ValueError, match=r"\[1\].*valid=False"):
        _adv([1.0, NAN], [0, 0])


def test_inputs_are_not_modified_and_registered():
    rewards = torch.tensor([1.0, NAN, 3.0])
    before = rewards.clone()
    grpo_advantages(rewards, torch.zeros(3, dtype=torch.long), torch.tensor([True, False, True]))
    torch.testing.assert_close(rewards, before, equal_nan=True)
    from types import SimpleNamespace

    from speechrl.rlhf.algos.estimators import AdvantageInputs

    groups, valid = torch.zeros(3, dtype=torch.long), torch.tensor([True, False, True])
    registered, returns = ADVANTAGES.get("grpo")(AdvantageInputs(rewards, groups, valid),
                                                 SimpleNamespace(std_normalize=True))
    assert returns is None  # one advantage per sample, no critic targets
    torch.testing.assert_close(registered, grpo_advantages(torch.nan_to_num(rewards), groups, valid))
