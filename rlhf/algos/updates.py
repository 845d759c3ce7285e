"""Updates: each online algorithm's step from scored samples to the `TrainBatch` the policy trains on.

GRPO, PPO and online DPO are peers looked up by `algorithm`, so the online loop never names one.
PPO's adaptive beta is saved in every checkpoint so a resumed run continues with the beta it had.
Each PPO sample (in realtime, each turn's reply) is its own episode: returns do not flow from later
turns to earlier ones. Unscored and empty samples never train.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from speechrl.rlhf.algos.batch import TrainBatch, sample_batch
from speechrl.rlhf.algos.estimators import AdvantageInputs
from speechrl.rlhf.algos.preference import check_dpo_beta
from speechrl.rlhf.algos.kl_reward import AdaptiveKLController, FixedKLController, kl_penalized_rewards
from speechrl.rlhf.algos.registry import ADVANTAGES, RECIPE_CHECKS
from speechrl.rlhf.core.config import RecipeError
from speechrl.rlhf.core.registry import Registry

log = logging.getLogger(__name__)

UPDATES = Registry("update")
KL_STATE = "kl_controller.json"  # in each PPO checkpoint, beside the policy and its value head

Prepared = tuple[Optional[TrainBatch], dict]  # (what the policy trains on, or None; the update's own metrics)


class Update:
    """An online algorithm's driver side. `prepare` runs in the loop's "advantages" phase."""

    needs_critic = False  # the policy worker keeps a value head (saved in checkpoints)

    def __init__(self, cfg, checkpoint: Optional[Path] = None):
        self.cfg = cfg

    @property
    def needs_reference(self) -> bool:
        """The policy worker keeps a frozen copy of the starting weights."""
        return self.cfg.rl.kl_coef > 0

    @classmethod
    def check(cls, cfg, source: str) -> None:
        """What this algorithm asks of the rest of the recipe (RECIPE_CHECKS runs it at load)."""

    def prepare(self, samples, scores, requests, policy) -> Prepared:
        raise NotImplementedError

    def save(self, checkpoint: Path) -> None:
        """The update's own state, into a checkpoint (none by default)."""


# A sample's metadata key for the weight of each of its completion tokens in the policy loss (one
# float per token; absent: 1 each). A mode sets it where the reward judges some tokens and not others
# (duplex: the decision and the tool call, not the codec tokens of the speech that follows), so the
# others get no share of the advantage, only the KL; GRPO multiplies it into a sample's advantage.
TOKEN_CREDIT = "token_credit"


def credited(advantages: np.ndarray, samples, keep: list[int]) -> list:
    """The kept samples' advantages: a float each, or, where a sample carries TOKEN_CREDIT, one per token."""
    credits = [(getattr(samples[i], "metadata", None) or {}).get(TOKEN_CREDIT) for i in keep]
    if all(c is None for c in credits):
        return advantages[keep].tolist()
    out = []
    for i, credit in zip(keep, credits):
        if credit is None:
            credit = [1.0] * len(samples[i].completion_ids)
        if len(credit) != len(samples[i].completion_ids):
            raise ValueError(f"sample {i}: {TOKEN_CREDIT} has {len(credit)} weights for "
                             f"{len(samples[i].completion_ids)} completion tokens")
        out.append([float(advantages[i]) * float(w) for w in credit])
    return out


def needs_groups(cfg, source: str) -> None:
    if cfg.rollout.sampling.n < 2:
        raise RecipeError(f"{source}: {cfg.algorithm} needs `rollout.sampling.n` >= 2 to form groups")


@UPDATES.register("grpo")
class GRPOUpdate(Update):
    @classmethod
    def check(cls, cfg, source: str) -> None:
        needs_groups(cfg, source)
        g = cfg.grpo  # grpo.dynamic_sampling's choices are in checks._CHOICES
        if g.overlong_buffer > cfg.rollout.sampling.max_new_tokens:
            raise RecipeError(f"{source}: `grpo.overlong_buffer`={g.overlong_buffer} is longer than "
                              f"`rollout.sampling.max_new_tokens`={cfg.rollout.sampling.max_new_tokens}; the buffer is "
                              "the last tokens before that cap")

    def prepare(self, samples, scores, requests, policy) -> Prepared:
        g = self.cfg.grpo
        groups = torch.tensor([s.prompt_index for s in samples])
        valid = torch.tensor(scores.valid, dtype=torch.bool)
        total = np.asarray(scores.total, dtype=np.float32)
        metrics = {}
        if g.overlong_buffer:
            penalty = overlong_penalty([len(s.completion_ids) for s in samples],
                                       self.cfg.rollout.sampling.max_new_tokens, g.overlong_buffer, g.overlong_penalty)
            total = total - penalty
            metrics["grpo/overlong_penalty"] = float(penalty.mean())
        adv, _ = ADVANTAGES.get(g.advantage)(AdvantageInputs(torch.tensor(total), groups, valid), g)
        flat = flat_groups(total, groups.numpy(), valid.numpy())
        metrics["grpo/zero_variance_groups"] = len(flat) / len(set(groups.tolist())) if len(groups) else 0.0
        dropped = flat if g.dynamic_sampling == "drop" else set()
        # an empty completion has no tokens to train
        keep = [i for i, s in enumerate(samples) if s.completion_ids and s.prompt_index not in dropped]
        if not keep:
            return None, metrics
        return sample_batch(samples, requests, keep, self.cfg.rollout.sampling.temperature,
                            advantages=credited(adv.numpy(), samples, keep), kl_coef=self.cfg.rl.kl_coef), metrics


def overlong_penalty(lengths: list[int], max_tokens: int, buffer: int, penalty: float) -> np.ndarray:
    """DAPO's soft overlong punishment (Yu et al. 2025): 0 up to max_tokens - buffer tokens, then
    growing linearly to `penalty` at max_tokens (a sample cut at the cap loses all of it)."""
    over = np.asarray(lengths, dtype=np.float32) - (max_tokens - buffer)
    return penalty * np.clip(over / buffer, 0.0, 1.0)


def flat_groups(rewards: np.ndarray, groups: np.ndarray, valid: np.ndarray) -> set[int]:
    """Groups whose scored rewards are all equal (or that have fewer than two scored samples): every
    advantage in them is 0, so they teach nothing."""
    flat = set()
    for g in np.unique(groups):
        scored = rewards[(groups == g) & valid]
        if len(scored) < 2 or np.ptp(scored) == 0:
            flat.add(int(g))
    return flat


@UPDATES.register("ppo")
class PPOUpdate(Update):
    needs_critic = True

    @classmethod
    def check(cls, cfg, source: str) -> None:
        if cfg.train.deepspeed.enabled:
            raise RecipeError(f"{source}: `algorithm: ppo` trains a value head beside the model, which the DeepSpeed "
                              "wrapper does not hold yet; set train.deepspeed.enabled=false")

    def __init__(self, cfg, checkpoint: Optional[Path] = None):
        super().__init__(cfg, checkpoint)
        p, beta = cfg.ppo, cfg.rl.kl_coef
        self.kl = AdaptiveKLController(beta, p.kl_target, p.kl_horizon) if p.kl_target else FixedKLController(beta)
        if checkpoint:  # the coefficient the interrupted run had reached, not the recipe's starting value
            self.kl.load_state_dict(json.loads((Path(checkpoint) / KL_STATE).read_text()))

    def prepare(self, samples, scores, requests, policy) -> Prepared:
        p = self.cfg.ppo
        keep = [i for i, s in enumerate(samples) if s.completion_ids and scores.valid[i]]
        if not keep:
            log.warning("no scored, non-empty sample this step; no update")
            return None, {"ppo/samples": 0}
        batch = sample_batch(samples, requests, keep, self.cfg.rollout.sampling.temperature)
        rollout = policy.values(batch)  # before any update: the critic's values, the reference's logprobs
        lengths = [len(c) for c in batch.completion_ids]
        width = max(lengths)
        mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        logprobs = padded(batch.sampling_logprobs, width)
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
        batch.advantages, batch.returns, batch.old_values = (_rows(t, lengths) for t in (adv, ret, values))
        batch.kl_coef = 0.0 if p.kl_in_reward else self.cfg.rl.kl_coef  # a loss term, as in GRPO
        return batch, metrics

    def save(self, checkpoint: Path) -> None:
        (checkpoint / KL_STATE).write_text(json.dumps(self.kl.state_dict()) + "\n")


@UPDATES.register("online_dpo")
class OnlineDPOUpdate(Update):
    """Pairs each prompt's best with its worst sample; the preference loss of offline DPO against
    the run's starting weights. `batch.pairs` keeps which samples each row came from."""

    @property
    def needs_reference(self) -> bool:
        return True

    @classmethod
    def check(cls, cfg, source: str) -> None:
        needs_groups(cfg, source)
        check_dpo_beta(cfg, source)

    def prepare(self, samples, scores, requests, policy) -> Prepared:
        groups = np.array([s.prompt_index for s in samples])
        total = np.asarray(scores.total, dtype=float)
        pairs = best_worst_pairs(total, np.asarray(scores.valid), groups, self.cfg.dpo.min_reward_gap)
        if not pairs:  # every group tied: nothing to prefer this round
            log.warning("no preference pairs this round (all groups tied or unscored); no update")
            return None, {"train/pairs": 0}
        batch = TrainBatch([samples[c].prompt_ids for c, _ in pairs], [samples[c].completion_ids for c, _ in pairs],
                           [requests[samples[c].prompt_index].audio for c, _ in pairs],
                           self.cfg.rollout.sampling.temperature,
                           rejected_ids=[samples[r].completion_ids for _, r in pairs], pairs=pairs)
        return batch, {"train/pairs": len(pairs)}


for name in UPDATES.names():  # an update's recipe check runs at load, like the offline algorithms' (preference.py)
    RECIPE_CHECKS.register(name)(UPDATES.get(name).check)


def best_worst_pairs(total: np.ndarray, valid: np.ndarray, groups: np.ndarray, min_gap: float = 0.0
                     ) -> list[tuple[int, int]]:
    """(chosen, rejected) sample indices: per group, the highest- and lowest-scored valid samples,
    when their rewards differ by more than `min_gap` (ties teach nothing). First index wins ties."""
    pairs = []
    for g in np.unique(groups):
        members = [i for i in np.flatnonzero(groups == g) if valid[i] and np.isfinite(total[i])]
        if len(members) < 2:
            continue
        scores = total[members]
        best, worst = members[int(np.argmax(scores))], members[int(np.argmin(scores))]
        if total[best] - total[worst] > min_gap:
            pairs.append((best, worst))
    return pairs


def ppo_targets(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor, kl_coef: float, gamma: float, lam: float, whiten: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, returns, kl), each [B, T]: KL-penalized per-token rewards (k1, whose per-token
    values sum to the reply's KL), then GAE. `kl_coef` 0 puts only the score in the reward."""
    from types import SimpleNamespace

    rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, "k1")
    inputs = AdvantageInputs(scores, torch.arange(len(scores)), torch.ones(len(scores), dtype=torch.bool),
                             token_rewards=rewards, values=values, mask=mask)
    params = SimpleNamespace(gamma=gamma, lam=lam, whiten_advantages=whiten)
    advantages, returns = ADVANTAGES.get("gae")(inputs, params)
    return advantages, returns, kl


def padded(rows: list[list[float]], width: int) -> torch.Tensor:
    """Ragged per-token rows as a right-padded [B, width] float32 tensor."""
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def _rows(grid: torch.Tensor, lengths: list[int]) -> list[list[float]]:
    return [grid[i, :n].tolist() for i, n in enumerate(lengths)]
