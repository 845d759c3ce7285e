"""Clipped surrogate policy loss of PPO (Schulman et al. 2017), for GRPO and PPO alike.

The importance ratio pi/pi_old is clipped to [1 - clip_eps, 1 + clip_eps_high]; a larger upper
bound is DAPO's clip-higher (Yu et al. 2025), which lets unlikely tokens gain probability and
so keeps entropy from collapsing. GRPO passes one advantage per sequence [B]; PPO with a critic
passes GAE's per-token advantages [B, T] (gae.py). The loss is the same formula for both.
"""
from __future__ import annotations

import torch
from torch import Tensor

from speechrl.rlhf.algos.registry import POLICY_LOSSES

# exp(20) ~ 5e8: larger log-ratios are a broken batch, not a signal, and would overflow bf16/fp16.
MAX_LOG_RATIO = 20.0


@POLICY_LOSSES.register("clipped")
def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss [B, T] (0 where `mask` is 0) and detached scalar metrics.

    loss = -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps_high) * A), ratio = exp(logprobs - old);
    `advantages` is [B] (broadcast over tokens) or [B, T]. clip_fraction is the share of tokens where the
    clipped branch wins, i.e. that get no gradient.
    """
    if clip_eps_high is None:
        clip_eps_high = clip_eps
    if clip_eps < 0 or clip_eps_high < 0:
        raise ValueError(f"clip_eps ({clip_eps}) and clip_eps_high ({clip_eps_high}) must be >= 0")
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape or logprobs.dim() != 2:
        raise ValueError(
            f"logprobs, old_logprobs and mask must be [B, T] of one shape; got {tuple(logprobs.shape)}, "
            f"{tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(f"advantages must be [B]={tuple(logprobs.shape[:1])} or [B, T]={tuple(logprobs.shape)}; "
                         f"got {tuple(advantages.shape)}")
    mask = mask.bool()
    # Zero the log-ratio on padding before exp: garbage logprobs there must not give inf/NaN grads.
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    adv = advantages.detach().to(logprobs.dtype)
    # Per-token advantages may be NaN on padding; even unselected by `where`, NaN * 0 grad is NaN.
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else torch.where(mask, adv, torch.zeros_like(adv))
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps_high) * adv
    per_token = torch.where(mask, torch.maximum(unclipped, clipped), torch.zeros_like(unclipped))

    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        zero = torch.zeros_like(ratio)
        metrics = {
            "clip_fraction": ((clipped > unclipped) & mask).sum() / n,
            "ratio_mean": torch.where(mask, ratio, zero).sum() / n,
            "ratio_max": torch.where(mask, ratio, zero).max() if ratio.numel() else zero.sum(),
        }
    return per_token, metrics
