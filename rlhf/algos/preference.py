"""Preference losses of DPO-style training, as pure functions over summed sequence logprobs.

With h = beta * (log-ratio of chosen - log-ratio of rejected), log-ratio = log pi - log ref: sigmoid
(DPO) is -(1 - eps) log sigma(h) - eps log sigma(-h); ipo is (h / beta - 1 / (2 beta))^2, fed per-token
mean logprobs so long completions do not dominate. Not TRL's: its loss is tied to DPOTrainer's
batches, and these plain-tensor formulas serve the offline and online paths alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from speechrl.rlhf.algos.registry import PREFERENCE_LOSSES, RECIPE_CHECKS
from speechrl.rlhf.core.config import RecipeError


def _margin(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor) -> Tensor:
    shapes = {tuple(t.shape) for t in (chosen, rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or chosen.dim() != 1:
        raise ValueError(f"chosen/rejected logprobs and their reference values must be [B] of one shape; got {sorted(shapes)}")
    return (chosen - ref_chosen.detach()) - (rejected - ref_rejected.detach())


def _metrics(beta: float, chosen, rejected, ref_chosen, ref_rejected) -> dict[str, Tensor]:
    with torch.no_grad():
        reward_chosen = beta * (chosen - ref_chosen)
        reward_rejected = beta * (rejected - ref_rejected)
        return {"reward_chosen": reward_chosen.mean(), "reward_rejected": reward_rejected.mean(),
                "reward_margin": (reward_chosen - reward_rejected).mean(),
                "reward_accuracy": (reward_chosen > reward_rejected).float().mean()}


@PREFERENCE_LOSSES.register("sigmoid")
def sigmoid_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                 beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair DPO loss [B] and detached metrics (implicit rewards, their margin and accuracy)."""
    if beta <= 0 or not 0 <= label_smoothing < 0.5:
        raise ValueError(f"need beta > 0 and 0 <= label_smoothing < 0.5; got beta={beta}, label_smoothing={label_smoothing}")
    h = beta * _margin(chosen, rejected, ref_chosen, ref_rejected)
    loss = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return loss, _metrics(beta, chosen, rejected, ref_chosen, ref_rejected)


@PREFERENCE_LOSSES.register("ipo")
def ipo_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair IPO loss [B]; `label_smoothing` is accepted for a uniform signature and must be 0."""
    if beta <= 0 or label_smoothing:
        raise ValueError(f"ipo: need beta > 0 and no label_smoothing; got beta={beta}, label_smoothing={label_smoothing}")
    margin = _margin(chosen, rejected, ref_chosen, ref_rejected)
    return (margin - 1 / (2 * beta)) ** 2, _metrics(beta, chosen, rejected, ref_chosen, ref_rejected)


def sft_term(chosen_token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-pair mean negative log-likelihood of the chosen completion's tokens [B] (RPO's extra
    term, Pang et al. 2024): keeps the chosen answers likely while the margin grows."""
    mask = mask.to(chosen_token_logprobs.dtype)
    return -(chosen_token_logprobs * mask).sum(-1) / mask.sum(-1).clamp(min=1)


@RECIPE_CHECKS.register("dpo")
def check_dpo_beta(cfg, source: str) -> None:
    """beta > 0 (also in core's range table, kept here for the updates that call this directly);
    IPO has no label smoothing, so a smoothed IPO recipe stops here, not mid-run in `ipo_loss`."""
    if cfg.dpo.beta <= 0:
        raise RecipeError(f"{source}: `dpo.beta` must be > 0, got {cfg.dpo.beta}")
    if cfg.dpo.loss == "ipo" and cfg.dpo.label_smoothing:
        raise RecipeError(f"{source}: `dpo.label_smoothing`={cfg.dpo.label_smoothing} has no meaning for "
                          "`dpo.loss: ipo`; set it to 0 or use `dpo.loss: sigmoid`")


@RECIPE_CHECKS.register("reward_model")
def check_reward_model(cfg, source: str) -> None:
    """The reward model trains all weights in one process (TRL's RewardTrainer on the decoder)."""
    if cfg.model.lora.enabled or cfg.train.deepspeed.enabled:
        raise RecipeError(f"{source}: `algorithm: reward_model` trains all weights in one process; "
                          "set model.lora.enabled=false and train.deepspeed.enabled=false")
