"""Advantage estimators by name, one signature for all (as verl registers GAE and GRPO side by side):
`estimator(inputs: AdvantageInputs, params) -> (advantages, returns or None)`.

GRPO maps one score per sample to one advantage per sample; GAE maps per-token rewards and the
critic's values to per-token advantages and the critic's returns. `params` is the recipe section
of the algorithm that names the estimator (`grpo.*`, `ppo.*`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from speechrl.rlhf.algos.gae import gae_advantages
from speechrl.rlhf.algos.grpo_advantage import grpo_advantages
from speechrl.rlhf.algos.registry import ADVANTAGES


@dataclass
class AdvantageInputs:
    scores: Tensor  # [B] each sample's total reward (NaN where unscored)
    groups: Tensor  # [B] the prompt each sample answers
    valid: Tensor  # [B] bool: the sample was scored
    token_rewards: Optional[Tensor] = None  # [B, T] per-token rewards (kl_reward.kl_penalized_rewards)
    values: Optional[Tensor] = None  # [B, T] the critic's values at rollout time
    mask: Optional[Tensor] = None  # [B, T] completion tokens


@ADVANTAGES.register("grpo")
def grpo(inputs: AdvantageInputs, params: Any) -> tuple[Tensor, None]:
    rewards = torch.nan_to_num(inputs.scores, nan=0.0)
    return grpo_advantages(rewards, inputs.groups, inputs.valid, std_normalize=params.std_normalize), None


@ADVANTAGES.register("gae")
def gae(inputs: AdvantageInputs, params: Any) -> tuple[Tensor, Tensor]:
    if inputs.token_rewards is None or inputs.values is None or inputs.mask is None:
        raise ValueError("gae needs per-token rewards, the critic's values and the completion mask")
    return gae_advantages(inputs.token_rewards, inputs.values, inputs.mask, params.gamma, params.lam,
                          whiten=params.whiten_advantages)
