"""The reward side of the loop: the rewards a recipe names, built once, scoring batch after batch.

`RewardWorker` is a plain class so it runs in process (tests, debugging) or as a Ray actor. Rewards
without `resources` share one light worker; one that declares some (a GPU, replicas) gets workers of
its own, and a `RewardRouter` fans each batch out and combines the raw scores into one ScoreResult.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from speechrl.rewards.combine import RawScores, ScoreResult, batch_size, batch_slice, combine_scores, score_rewards
from speechrl.rewards.registry import find_reward, resolve_reward
from speechrl.rlhf.core.config import RewardResources, RewardSpec
from speechrl.rollouts.codec import CodecSpec, decode_column


def _as_spec(spec: Any) -> RewardSpec:
    """A RewardSpec from a dict (its `resources` may be a dict too)."""
    if not isinstance(spec, Mapping):
        return spec
    known = {f.name for f in fields(RewardSpec)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"reward spec {dict(spec)}: unknown keys {unknown}; allowed: {sorted(known)}")
    spec = dict(spec)
    if isinstance(spec.get("resources"), Mapping):
        spec["resources"] = RewardResources(**spec["resources"])
    return RewardSpec(**spec)


def _checked_specs(specs: Iterable[Any]) -> list[RewardSpec]:
    specs = [_as_spec(s) for s in specs]
    if not specs:
        raise ValueError("RewardWorker: no rewards configured; the recipe's `rewards` list is empty")
    keys = [s.key for s in specs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        # Scores and logs are keyed by name; two rewards under one name would overwrite each other.
        raise ValueError(f"RewardWorker: rewards {repeated} are listed more than once; list each reward once, "
                         "or give the repeats an `alias`")
    return specs


class AudioDecoder:
    """TTS batches arrive as codec ids (`codec_ids`); rewards listen to waveforms. The reward side
    decodes them into `audio` (and `sample_rate`), so the policy never runs the codec."""

    def __init__(self, codec: Optional[CodecSpec]):
        self.spec, self._codec = codec, None

    def __call__(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        if self.spec is None or "codec_ids" not in batch or "audio" in batch:
            return batch
        if self._codec is None:
            self._codec = self.spec.build()
        out = {**batch, "audio": decode_column(self._codec, batch["codec_ids"]), "sample_rate": self._codec.sample_rate}
        if batch.get("reference_codec_ids") is not None:  # voice prompts, for speaker similarity
            refs: dict[tuple, Any] = {}  # the n samples of a prompt share its voice prompt: decode it once
            out["reference_audio"] = [None if ids is None else refs.setdefault(tuple(ids), self._codec.decode(ids))
                                      for ids in batch["reference_codec_ids"]]
        return out


class RewardWorker:
    def __init__(self, specs: Iterable[Any], codec: Optional[CodecSpec] = None, threads: Optional[int] = None):
        specs = _checked_specs(specs)
        _set_threads(threads)
        self.rewards = {s.key: resolve_reward(s.name, **dict(s.kwargs)) for s in specs}
        self.weights = {s.key: float(s.weight) for s in specs}
        self.normalize = {s.key: bool(s.normalize) for s in specs}
        self.decode = AudioDecoder(codec)
        if codec is not None:  # a reward that reads codec ids checks they are its codec's
            for reward in self.rewards.values():
                if hasattr(reward, "check_codec"):
                    reward.check_codec(codec)

    def raw(self, batch: Mapping[str, Any]) -> RawScores:
        """The rewards' outputs, not yet combined (what a RewardRouter gathers)."""
        return score_rewards(self.rewards, self.decode(batch))

    def score(self, batch: Mapping[str, Any]) -> ScoreResult:
        """Score one batch: completions, completion_ids, mode and the dataset columns as lists."""
        return combine_scores(self.raw(batch), self.weights, self.normalize, ids=batch.get("id"))


class RewardRouter:
    """One batch in, one ScoreResult out, over reward workers placed by their declared resources."""

    def __init__(self, specs: Iterable[Any], num_cpus: float = 0, num_gpus: float = 0,
                 codec: Optional[CodecSpec] = None, retries: int = 0, threads: Optional[int] = None):
        import ray

        specs = _checked_specs(specs)
        _set_threads(threads)  # the router decodes the codec ids
        restarts = dict(max_restarts=retries, max_task_retries=retries)
        self.decode = AudioDecoder(codec)  # once here, not in every worker
        self.weights = {s.key: float(s.weight) for s in specs}
        self.normalize = {s.key: bool(s.normalize) for s in specs}
        shared = [s for s in specs if not s.resources.declared()]
        actor = ray.remote(RewardWorker)
        # a list of groups; a group is the replicas of one worker, each scoring a slice of the batch
        # the codec goes along for `check_codec` only: batches reach the workers decoded
        # every worker scores its slice at the same time: they split the cores between them
        at_once = bool(shared) + sum(s.resources.replicas for s in specs if s.resources.declared())
        from speechrl.rlhf.core.seeding import thread_count

        share = None if threads is None else thread_count(threads, at_once)
        self.groups = ([[actor.options(num_cpus=num_cpus, num_gpus=num_gpus, **restarts).remote(shared, codec, share)]]
                       if shared else [])
        for s in specs:
            r = s.resources
            if r.declared():
                options = actor.options(num_cpus=r.num_cpus, num_gpus=r.num_gpus, memory=int(r.memory_gib * 2**30),
                                        **restarts)
                self.groups.append([options.remote([s], codec, share) for _ in range(r.replicas)])

    def score(self, batch: Mapping[str, Any]) -> ScoreResult:
        import ray

        batch = self.decode(batch)
        n = batch_size(batch)
        calls = []  # (group index, first sample of the slice, ObjectRef of its RawScores)
        for g, replicas in enumerate(self.groups):
            bounds = np.linspace(0, n, len(replicas) + 1).astype(int)
            for worker, start, stop in zip(replicas, bounds[:-1], bounds[1:]):
                if stop > start:
                    calls.append((g, int(start), worker.raw.remote(batch_slice(batch, start, stop))))
        parts = ray.get([ref for _, _, ref in calls])
        raw = RawScores(components={})
        for g in range(len(self.groups)):
            group = _concat([(start, part) for (of, start, _), part in zip(calls, parts) if of == g])
            raw.components.update(group.components)
            for i, why in group.reasons.items():
                raw.reasons.setdefault(i, []).extend(why)
        # recipe order, so that logs and totals do not depend on which worker answered first
        raw.components = {k: raw.components[k] for k in self.weights}
        return combine_scores(raw, self.weights, self.normalize, ids=batch.get("id"))


def _concat(slices: list[tuple[int, RawScores]]) -> RawScores:
    """The scores of consecutive slices of a batch, given as (first sample, scores), as one."""
    out = RawScores(components={})
    for name in slices[0][1].components:
        sizes = [len(part.components[name]["reward"]) for _, part in slices]
        keys = dict.fromkeys(k for _, part in slices for k in part.components[name])
        out.components[name] = {k: np.concatenate([part.components[name].get(k, np.full(size, np.nan))
                                                   for (_, part), size in zip(slices, sizes)]) for k in keys}
    for start, part in slices:
        for i, why in part.reasons.items():
            out.reasons.setdefault(start + i, []).extend(why)
    return out


def _set_threads(threads: Optional[int]) -> None:
    """torch's intra-op threads in a reward actor: Ray starts an actor with OMP_NUM_THREADS=1 (its
    num_cpus), but scoring is a phase of its own (generate, score, update take turns), so a model
    judge may use every core while it runs. None: leave the process as it is (in-process use)."""
    if threads is not None:
        from speechrl.rlhf.core.seeding import set_threads  # torch: only where a worker is made

        set_threads(threads)


def make_reward_actor(specs: Iterable[Any], num_cpus: float = 0, num_gpus: float = 0,
                      codec: Optional[CodecSpec] = None, retries: int = 0, threads: Optional[int] = None):
    """The recipe's rewards as a Ray actor; call `ray.get(actor.score.remote(batch))`.

    num_cpus=0 by default: scoring text is light and must not hold a CPU the rollouts need. Unknown
    names and resources the cluster lacks fail here, before any worker starts. With `codec` (TTS),
    `codec_ids` are decoded into waveforms on the worker, before scoring. A worker that dies is
    restarted by Ray and its call retried, up to `retries` times (Ray's max_restarts and
    max_task_retries: scoring is a pure function of the batch, so a retry scores the same).
    `threads`: torch threads in each worker (0 = every core, split among the workers that score at once).
    """
    restarts = dict(max_restarts=retries, max_task_retries=retries)
    import ray  # here, so importing this module neither needs Ray nor starts it

    specs = _checked_specs(specs)
    for s in specs:
        find_reward(s.name)
    if not any(s.resources.declared() for s in specs):
        return ray.remote(RewardWorker).options(num_cpus=num_cpus, num_gpus=num_gpus, **restarts).remote(
            specs, codec, threads)
    _check_cluster_has(specs)
    return ray.remote(RewardRouter).options(num_cpus=0, **restarts).remote(specs, num_cpus, num_gpus, codec, retries,
                                                                          threads)


def _check_cluster_has(specs: list[RewardSpec]) -> None:
    """Ray would wait forever for an actor no node can hold; say so instead."""
    import ray

    total = ray.cluster_resources()
    for s in specs:
        r = s.resources
        for field_name, asked, have in (("num_cpus", r.num_cpus, total.get("CPU", 0)),
                                        ("num_gpus", r.num_gpus, total.get("GPU", 0)),
                                        ("memory_gib", r.memory_gib, total.get("memory", 0) / 2**30)):
            if asked > have:
                raise ValueError(f"reward {s.key!r}: resources.{field_name}={asked:g} per worker, but the Ray cluster "
                                 f"has {have:g} in all; lower it, or give Ray more (ray.num_cpus, a GPU node)")
