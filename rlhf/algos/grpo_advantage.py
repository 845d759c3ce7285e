"""Group-relative advantages: GRPO (Shao et al. 2024) scores each sample against its siblings.

Samples that answer the same prompt share a `group_index`; a sample's advantage is its reward
minus its group's mean, divided by the group's std unless `std_normalize=False` (Dr. GRPO,
Liu et al. 2025: dividing by std over-weights near-unanimous groups, i.e. too easy/hard prompts).
Registered as the "grpo" estimator in estimators.py.
"""
from __future__ import annotations

import torch
from torch import Tensor


def grpo_advantages(
    rewards: Tensor,
    group_index: Tensor,
    valid: Tensor,
    std_normalize: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Per-sample advantages, shape [B], dtype of `rewards`.

    Statistics use the group's valid members, with the population std so a group's advantages have unit
    variance. Invalid samples (a failed reward, NaN) and groups with under two valid members get 0: with
    nothing to compare against, they must push the policy neither way.
    """
    if not (rewards.dim() == 1 and rewards.shape == group_index.shape == valid.shape):
        raise ValueError(
            f"rewards, group_index and valid must be 1-D of one length; got shapes "
            f"{tuple(rewards.shape)}, {tuple(group_index.shape)}, {tuple(valid.shape)}"
        )
    valid = valid.bool()
    bad = valid & ~torch.isfinite(rewards)
    if bad.any():
        raise ValueError(
            f"rewards at {bad.nonzero().flatten().tolist()} are not finite but marked valid; "
            "mark failed rewards with valid=False"
        )
    # Dense group ids 0..G-1, so any ids (sparse, negative) work with index_add.
    _, group = torch.unique(group_index, return_inverse=True)
    num_groups = int(group.max()) + 1 if group.numel() else 0
    weight = valid.to(rewards.dtype)
    r = torch.where(valid, rewards, torch.zeros_like(rewards))  # NaN * 0 would still be NaN

    count = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add(0, group, weight)
    mean = torch.zeros_like(count).index_add(0, group, r) / count.clamp(min=1)
    centered = (r - mean[group]) * weight
    advantages = centered
    if std_normalize:
        var = torch.zeros_like(count).index_add(0, group, centered**2) / count.clamp(min=1)
        advantages = centered / (var.sqrt()[group] + eps)
    scored = valid & (count[group] >= 2)
    return torch.where(scored, advantages, torch.zeros_like(advantages))
