"""PPO with a critic: GRPO's driver (rollouts, rewards, sync, evaluation, checkpoints, resume) with
its own advantages and update.

    advantages  the policy worker reads, at rollout time and before any update, the critic's value
                of every completion token's state and the reference's logprobs; then, here, pure
                functions: per-token rewards = the sample's score on its last token minus
                beta * KL(policy || reference) on every token (algos/kl_reward.py), and GAE with
                ppo.gamma and ppo.lam (algos/gae.py) gives per-token advantages and returns
    update      clipped policy loss on the per-token advantages plus ppo.vf_coef times the clipped
                value loss, over rl.epochs_per_step epochs of rl.minibatches minibatches
    KL          beta starts at rl.kl_coef and is fixed, or adapted toward ppo.kl_target
                (AdaptiveKLController); its state is saved in every checkpoint, so a resumed run
                continues with the beta the interrupted one had. With ppo.kl_in_reward=false the
                KL is a loss term instead, as in GRPO.

The critic is a value head on the policy's own trunk (rlhf/critic.py, trained with the policy by one
optimizer): the update's one forward pass gives both the logprobs and the values, so PPO costs
about what GRPO does; vf_coef keeps the value loss from swamping the policy's. Credit: each sample
(in realtime mode, each turn's reply) is an episode of its own; its score lands on its last token
and GAE spreads it over the reply's tokens. Returns do not flow from later turns to earlier ones.
Samples the rewards left unscored, and empty completions, are left out of the update.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from speechrl.rlhf.algos.gae import gae_advantages
from speechrl.rlhf.algos.kl_reward import AdaptiveKLController, FixedKLController, kl_penalized_rewards
from speechrl.rlhf.trainers.grpo import GRPORecipe, run_grpo

log = logging.getLogger(__name__)

KL_STATE = "kl_controller.json"  # in each checkpoint, beside the policy and its value head


@dataclass
class PPOBatch:
    """A step's samples ready for the update: which samples train, and their per-token targets."""

    keep: list[int]  # indices of the samples that train (scored, non-empty)
    advantages: list[list[float]]  # per completion token
    returns: list[list[float]]  # the critic's regression targets, per completion token
    values: list[list[float]]  # the critic's values at rollout time, per completion token
    metrics: dict[str, float]


def padded(rows: list[list[float]], width: int) -> torch.Tensor:
    """Ragged per-token rows as a right-padded [B, width] float32 tensor."""
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def ppo_targets(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor, kl_coef: float, gamma: float, lam: float, whiten: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, returns, kl), each [B, T]: KL-penalized per-token rewards (k1, whose per-token
    values sum to the reply's KL), then GAE. `kl_coef` 0 puts only the score in the reward."""
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, "k1")
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam, whiten=whiten)
    return advantages, returns, kl


class PPORecipe(GRPORecipe):
    def setup(self) -> None:
        super().setup()
        self.kl = self.kl_controller(self.checkpoint)

    def kl_controller(self, checkpoint: Optional[Path]):
        """The recipe's KL controller; from a checkpoint, with the coefficient the interrupted run
        had reached (not the recipe's starting value), so a resumed run continues exactly."""
        p, beta = self.cfg.ppo, self.cfg.rl.kl_coef
        kl = AdaptiveKLController(beta, p.kl_target, p.kl_horizon) if p.kl_target else FixedKLController(beta)
        if checkpoint:
            kl.load_state_dict(json.loads((Path(checkpoint) / KL_STATE).read_text()))
        return kl

    def advantages(self, samples, scores, requests) -> Optional[PPOBatch]:
        import ray

        p = self.cfg.ppo
        keep = [i for i, s in enumerate(samples) if s.completion_ids and scores.valid[i]]
        if not keep:
            log.warning("no scored, non-empty sample this step; no update")
            return None
        rollout = ray.get(self.policy.rollout_values.remote(
            [samples[i].prompt_ids for i in keep], [samples[i].completion_ids for i in keep],
            [requests[samples[i].prompt_index].audio for i in keep], self.cfg.rollout.sampling.temperature))
        lengths = [len(samples[i].completion_ids) for i in keep]
        width = max(lengths)
        mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        logprobs = padded([samples[i].logprobs for i in keep], width)
        ref = padded(rollout["ref_logprobs"], width) if rollout["ref_logprobs"] is not None else logprobs
        values = padded(rollout["values"], width)
        beta = self.kl.kl_coef if p.kl_in_reward else 0.0
        adv, ret, kl = ppo_targets(torch.tensor(np.asarray(scores.total)[keep], dtype=torch.float32), logprobs, ref,
                                   values, mask, beta, p.gamma, p.lam, p.whiten_advantages)
        reply_kl = float(kl.sum(-1).mean())
        metrics = {"ppo/kl_coef": beta, "ppo/reply_kl": reply_kl, "train/kl": float(kl[mask].mean()),
                   "ppo/value_mean": float(values[mask].mean()), "ppo/return_mean": float(ret[mask].mean()),
                   "ppo/samples": len(keep)}
        if p.kl_in_reward:
            self.kl.update(reply_kl, len(keep))  # the next step's beta
        return PPOBatch(keep, *(_rows(t, lengths) for t in (adv, ret, values)), metrics)

    def update(self, samples, requests, batch: Optional[PPOBatch]) -> dict:
        if batch is None:
            return {"ppo/samples": 0}
        metrics = self.policy_update(samples, requests, batch.keep, batch.advantages, returns=batch.returns,
                                     old_values=batch.values)
        return {**metrics, **batch.metrics}

    def save_state(self, path: Path) -> None:
        (path / KL_STATE).write_text(json.dumps(self.kl.state_dict()) + "\n")


def _rows(grid: torch.Tensor, lengths: list[int]) -> list[list[float]]:
    return [grid[i, :n].tolist() for i, n in enumerate(lengths)]


def run_ppo(cfg, resume: Optional[str] = None) -> dict:
    return run_grpo(cfg, resume, PPORecipe)
