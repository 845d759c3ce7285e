"""The reward side of the loop: the rewards a recipe names, built once, scoring batch after batch.

`RewardWorker` is a plain class, so it runs in-process (tests, one-machine debugging) or as a Ray
actor (`make_reward_actor`) beside the rollout and training actors, holding its reward models.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Iterable, Mapping

from speechrl.rewards.combine import ScoreResult, score_batch
from speechrl.rewards.registry import resolve_reward
from speechrl.rlhf.config import RewardSpec


def _as_spec(spec: Any) -> Any:
    """A RewardSpec from a dict; objects with .name/.weight/.normalize/.kwargs pass as they are."""
    if not isinstance(spec, Mapping):
        return spec
    known = {f.name for f in fields(RewardSpec)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"reward spec {dict(spec)}: unknown keys {unknown}; allowed: {sorted(known)}")
    return RewardSpec(**spec)


class RewardWorker:
    def __init__(self, specs: Iterable[Any]):
        specs = [_as_spec(s) for s in specs]
        if not specs:
            raise ValueError("RewardWorker: no rewards configured; the recipe's `rewards` list is empty")
        names = [s.name for s in specs]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            # Scores and logs are keyed by name; two rewards under one name would overwrite each other.
            raise ValueError(f"RewardWorker: rewards {repeated} are listed more than once; list each reward once")
        self.rewards = {s.name: resolve_reward(s.name, **dict(s.kwargs)) for s in specs}
        self.weights = {s.name: float(s.weight) for s in specs}
        self.normalize = {s.name: bool(s.normalize) for s in specs}

    def score(self, batch: Mapping[str, Any]) -> ScoreResult:
        """Score one batch: completions, completion_ids, mode and the dataset columns as lists."""
        return score_batch(self.rewards, batch, weights=self.weights, normalize=self.normalize)


def make_reward_actor(specs: Iterable[Any], num_cpus: float = 0, num_gpus: float = 0):
    """A `RewardWorker` as a Ray actor; call `ray.get(actor.score.remote(batch))`.

    num_cpus=0 by default: scoring text is light and must not hold a CPU the rollouts need;
    give reward models that run on a GPU num_gpus=1.
    """
    import ray  # here, so importing this module neither needs Ray nor starts it

    actor_cls = ray.remote(RewardWorker)
    return actor_cls.options(num_cpus=num_cpus, num_gpus=num_gpus).remote(list(specs))
