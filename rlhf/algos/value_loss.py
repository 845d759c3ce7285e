"""Clipped value loss of PPO's critic (as in OpenAI's baselines), the counterpart of the ratio clip.

V_clip = old_V + clip(V - old_V, -clip_range, clip_range);  loss = 0.5 * max((V - R)^2, (V_clip - R)^2).
The max is pessimistic: a value pushed past the range toward R earns nothing for it, one moving away
is still corrected. Per-token like the policy losses, so any of aggregate.py's rules reduces it.
"""
from __future__ import annotations

import torch
from torch import Tensor


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float | None = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss [B, T] (0 where `mask` is 0) and detached scalar metrics.

    `old_values` and `returns` are constants of the update (detached here); `clip_range=None` is plain
    0.5 * (V - R)^2. value_clip_fraction is the share of tokens that get no gradient; value_mse is unclipped.
    """
    if not (values.dim() == 2 and values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError(f"values, old_values, returns and mask must be [B, T] of one shape; got {tuple(values.shape)}, "
                         f"{tuple(old_values.shape)}, {tuple(returns.shape)}, {tuple(mask.shape)}")
    if clip_range is not None and clip_range < 0:
        raise ValueError(f"clip_range must be >= 0 or None; got {clip_range}")
    mask = mask.bool()
    zero = torch.zeros_like(values)
    # Zero the inputs on padding: NaN there would reach the gradient even through an unselected `where`.
    returns = torch.where(mask, returns.detach(), zero)
    old_values = torch.where(mask, old_values.detach(), zero)
    values = torch.where(mask, values, zero)
    unclipped = (values - returns) ** 2
    if clip_range is None:
        clipped = unclipped
    else:
        v_clip = old_values + (values - old_values).clamp(-clip_range, clip_range)
        clipped = (v_clip - returns) ** 2
    per_token = torch.where(mask, 0.5 * torch.maximum(unclipped, clipped), zero)

    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        metrics = {
            "value_clip_fraction": ((clipped > unclipped) & mask).sum() / n,
            "value_mse": unclipped.sum() / n,
        }
    return per_token, metrics
