"""Generalized advantage estimation (Schulman et al. 2016): PPO's per-token advantages from a critic.

delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  R_t = A_t + V_t (critic target),
with V_n = A_n = 0: the episode ends at the last token, truncated ones too, as their score is final.
lam = 1 is the unbiased, high-variance Monte Carlo advantage; lam = 0 the critic-biased TD error.
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def gae_advantages(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = False,
) -> tuple[Tensor, Tensor]:
    """(advantages, returns), both [B, T], 0 where `mask` is 0, detached.

    `rewards` are per-token (kl_reward.kl_penalized_rewards); `values` are V_t, the state before token t.
    The recursion passes over masked positions unchanged, so padding or gaps (even NaN) neither contribute
    nor leak. `whiten` standardizes advantages after the returns are formed: the critic's targets stay raw.
    """
    if not (rewards.dim() == 2 and rewards.shape == values.shape == mask.shape):
        raise ValueError(f"rewards, values and mask must be [B, T] of one shape; got {tuple(rewards.shape)}, "
                         f"{tuple(values.shape)}, {tuple(mask.shape)}")
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise ValueError(f"gamma and lam must be in [0, 1]; got gamma={gamma}, lam={lam}")
    mask = mask.bool()
    zero = torch.zeros_like(values[:, 0])
    next_value, next_adv = zero, zero
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        adv = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_adv
        advantages[:, t] = torch.where(m, adv, zero)
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv, next_adv)
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with mean and population var over the tokens where `mask` is
    nonzero, 0 elsewhere. Pass the whole step's batch: statistics of one micro-batch would give
    each micro-batch its own scale."""
    if x.shape != mask.shape:
        raise ValueError(f"x and mask must have one shape; got {tuple(x.shape)}, {tuple(mask.shape)}")
    mask = mask.bool()
    n = mask.sum().clamp(min=1)
    values = torch.where(mask, x, torch.zeros_like(x))
    mean = values.sum() / n
    centered = torch.where(mask, x - mean, torch.zeros_like(x))
    var = (centered**2).sum() / n
    return centered * torch.rsqrt(var + eps)
