"""KL in the reward: PPO-RLHF's per-token rewards and the controllers of their KL coefficient beta.

Classic RLHF (Ziegler et al. 2019) subtracts the KL from the reward instead of adding it to the loss
(GRPO's way): r_t = -beta * kl_t + [t is the last completion token] * score, so the critic learns
the KL-regularized return and GAE spreads both over the tokens.
"""
from __future__ import annotations

import torch
from torch import Tensor

from speechrl.rlhf.algos.registry import KL_ESTIMATORS


@torch.no_grad()
def kl_penalized_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """(rewards, kl), both [B, T], 0 where `mask` is 0, detached.

    kl is the named estimator (kl.py) of rollout `logprobs` against `ref_logprobs`; k1 is the usual pick,
    as its per-token values sum to an unbiased sequence KL and negative ones are fine in a reward.
    A row with no valid token gets no reward (its score is dropped).
    """
    if not (logprobs.dim() == 2 and logprobs.shape == ref_logprobs.shape == mask.shape):
        raise ValueError(f"logprobs, ref_logprobs and mask must be [B, T] of one shape; got {tuple(logprobs.shape)}, "
                         f"{tuple(ref_logprobs.shape)}, {tuple(mask.shape)}")
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(f"scores must be [B]={tuple(logprobs.shape[:1])}; got {tuple(scores.shape)}")
    mask = mask.bool()
    has_tokens = mask.any(dim=-1)
    bad = has_tokens & ~torch.isfinite(scores)
    if bad.any():
        raise ValueError(f"scores at {bad.nonzero().flatten().tolist()} are not finite; "
                         "drop failed samples (or zero their mask rows) before building rewards")
    kl = KL_ESTIMATORS.get(kl_estimator)(logprobs, ref_logprobs)
    kl = torch.where(mask, kl, torch.zeros_like(kl))
    rewards = -kl_coef * kl
    # last valid index: T-1 minus the position of the first True in the reversed row
    last = mask.shape[1] - 1 - mask.flip(-1).int().argmax(dim=-1)
    rows = has_tokens.nonzero().flatten()
    rewards[rows, last[rows]] += scores[rows].to(rewards.dtype)
    return rewards, kl


class FixedKLController:
    """beta stays at `kl_coef`; the same interface as AdaptiveKLController."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0; got {kl_coef}")
        self.kl_coef = float(kl_coef)

    def update(self, kl: float, n_steps: int) -> float:
        return self.kl_coef

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict) -> None:
        self.kl_coef = float(state["kl_coef"])


class AdaptiveKLController:
    """Ziegler et al. (2019)'s proportional controller of beta toward a target KL.

    e = clip(kl / target - 1, -0.2, 0.2), beta <- beta * (1 + e * n_steps / horizon), with `kl` the mean
    per-sequence KL (summed over tokens: the unit of `target`). The clip bounds beta's change to about
    1.22x per `horizon` samples, so one noisy batch cannot swing it.
    """

    def __init__(self, kl_coef: float, target: float, horizon: float):
        if kl_coef <= 0 or target <= 0 or horizon <= 0:
            raise ValueError(f"kl_coef, target and horizon must be > 0; got {kl_coef}, {target}, {horizon}")
        self.kl_coef, self.target, self.horizon = float(kl_coef), float(target), float(horizon)

    def update(self, kl: float, n_steps: int) -> float:
        """Adapts beta to the KL just measured and returns the new beta."""
        if not 0 < n_steps < 5 * self.horizon:  # at 5 * horizon the factor 1 - 0.2 * n / horizon hits 0
            raise ValueError(f"n_steps must be in (0, 5 * horizon = {5 * self.horizon:g}); got {n_steps}")
        error = min(max(float(kl) / self.target - 1.0, -0.2), 0.2)
        self.kl_coef *= 1.0 + error * n_steps / self.horizon
        return self.kl_coef

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict) -> None:
        self.kl_coef = float(state["kl_coef"])
