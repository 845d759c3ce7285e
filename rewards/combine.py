"""Scoring a batch with several rewards and combining them into one number per sample.

One bad sample must not cost the step: a failing batch is retried sample by sample, and only samples
that still fail (or score None/NaN/inf) lose their score. A reward of the wrong shape or failing on
every sample stops the run: hours of training on no signal are worse than an error now. Scoring and
combining are separate steps so rewards on workers of their own are still weighted together.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import numpy as np

from speechrl.rewards.api import Unscored, call_reward

log = logging.getLogger(__name__)

STD_FLOOR = 1e-6  # below this a component does not tell the samples apart; it contributes 0
PER_SAMPLE = (list, tuple, np.ndarray)  # batch values of these types are per-sample columns
_LOGGED = 3  # reasons, and samples per reason, named in the one warning per batch; the rest are counted


class RewardOutputError(ValueError):
    """A reward returned something that is not one number (or None) per sample."""


@dataclass
class ScoreResult:
    total: np.ndarray  # combined reward per sample; NaN where the sample has no score
    valid: np.ndarray  # bool per sample: every reward of nonzero weight gave it a finite score
    rewards: dict[str, np.ndarray]  # each reward's "reward" component, as returned (before normalization)
    components: dict[str, np.ndarray]  # every component, keyed "<reward name>/<component>", for logging
    errors: dict[int, str] = field(default_factory=dict)  # sample index -> why it has no score

    def metrics(self) -> dict[str, float]:
        """Means over the scored samples, and how many samples went unscored."""
        out = {"rewards/total": _mean(self.total[self.valid])}
        for key, values in self.components.items():
            out[f"rewards/{key}"] = _mean(values[self.valid])
        out["rewards/unscored"] = int((~self.valid).sum())
        return out


@dataclass
class RawScores:
    """Rewards' outputs before combining: what a reward worker sends to whoever combines."""

    components: dict[str, dict[str, np.ndarray]]  # reward name -> component -> one value per sample
    reasons: dict[int, list[str]] = field(default_factory=dict)  # sample index -> why rewards gave no score


def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def batch_size(batch: Mapping[str, Any]) -> int:
    columns = {k: len(v) for k, v in batch.items() if isinstance(v, PER_SAMPLE)}
    if not columns:
        raise ValueError("score_batch: the batch has no per-sample columns (lists); pass at least 'completions'")
    n = columns.get("completions", next(iter(columns.values())))
    wrong = {k: size for k, size in columns.items() if size != n}
    if wrong:
        raise ValueError(f"score_batch: columns {wrong} do not have the batch size {n} (of 'completions')")
    return n


def batch_slice(batch: Mapping[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Samples start..stop-1 of the batch; values that are not per-sample columns go along as they are."""
    return {k: v[start:stop] if isinstance(v, PER_SAMPLE) else v for k, v in batch.items()}


def _as_components(name: str, out: Any, n: int) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """The output as arrays of n floats, and the reasons its `Unscored` scores give."""
    items = out.items() if isinstance(out, Mapping) else [("reward", out)]
    if isinstance(out, Mapping) and "reward" not in out:
        raise RewardOutputError(f"reward {name!r} returned components {sorted(out)} without the 'reward' key; add it")
    components, reasons = {}, {}
    for key, values in items:
        try:
            array = np.array([math.nan if v is None else v for v in values], dtype=float)
        except (TypeError, ValueError) as e:
            raise RewardOutputError(f"reward {name!r}: component {key!r} is not a list of numbers ({e})") from e
        if array.shape != (n,):
            raise RewardOutputError(
                f"reward {name!r}: component {key!r} has shape {array.shape} for a batch of {n}; return one number per completion"
            )
        components[key] = array
        if key == "reward":
            reasons = {i: f"{name}: {v.reason}" for i, v in enumerate(values) if isinstance(v, Unscored)}
    return components, reasons


def _call_per_sample(name: str, fn: Callable, batch: Mapping[str, Any], n: int) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    rows: list[Optional[dict[str, np.ndarray]]] = []
    failed: dict[int, str] = {}
    for i in range(n):
        try:
            row, why = _as_components(name, call_reward(fn, batch_slice(batch, i, i + 1)), 1)
            rows.append(row)
            if why:
                failed[i] = why[0]
        except RewardOutputError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of user code marks only this sample
            failed[i] = f"{name} raised {type(e).__name__}: {e}"
            rows.append(None)
    # One sample cannot tell a broken reward from a bad sample, so only a larger batch stops here.
    if n > 1 and all(row is None for row in rows):
        raise RuntimeError(f"reward {name!r} failed on every sample of the batch, e.g. {failed[0]}; fix the reward or its kwargs")
    keys = dict.fromkeys(["reward"] + [k for row in rows if row for k in row])
    components = {k: np.array([row[k][0] if row and k in row else math.nan for row in rows]) for k in keys}
    return components, failed


def score_rewards(rewards: Mapping[str, Callable], batch: Mapping[str, Any]) -> RawScores:
    """Call every reward on the whole batch (columns as keyword arguments); no combining.

    List-valued batch entries are per-sample columns; anything else (e.g. `mode`) is passed as is
    to every call.
    """
    n = batch_size(batch)
    raw = RawScores(components={})
    for name, fn in rewards.items():
        try:
            comps, failed = _as_components(name, call_reward(fn, batch), n)
        except RewardOutputError:
            raise
        except Exception as e:  # noqa: BLE001
            log.warning("reward %r raised on the batch (%s: %s); retrying sample by sample", name, type(e).__name__, e)
            comps, failed = _call_per_sample(name, fn, batch, n)
        for i in np.flatnonzero(~np.isfinite(comps["reward"])):
            raw.reasons.setdefault(int(i), []).append(failed.get(int(i), f"{name} returned {comps['reward'][i]}"))
        raw.components[name] = comps
    return raw


def combine_scores(
    raw: RawScores,
    weights: Optional[Mapping[str, float]] = None,
    normalize: Optional[Mapping[str, bool]] = None,
    ids: Optional[Any] = None,
) -> ScoreResult:
    """Weight and normalize the rewards' outputs into one ScoreResult; warn once about unscored samples.

    `weights` defaults to 1.0 and `normalize` to False for every reward; `ids` (the batch's "id"
    column) labels the unscored samples in the warning.
    """
    per_reward = {name: comps["reward"] for name, comps in raw.components.items()}
    total, valid = combine(
        per_reward,
        weights if weights is not None else dict.fromkeys(per_reward, 1.0),
        normalize if normalize is not None else dict.fromkeys(per_reward, False),
    )
    errors = {i: "; ".join(why) for i, why in sorted(raw.reasons.items()) if not valid[i]}
    if errors:
        log.warning("%d of %d samples have no reward: %s", len(errors), len(total), _summary(errors, ids))
    logged_only = {i: "; ".join(why) for i, why in sorted(raw.reasons.items()) if valid[i]}
    if logged_only:  # a weight-0 reward could not score them: they are scored and trained on all the same
        log.info("%d of %d samples lack a logged-only (weight 0) reward, trained on anyway: %s", len(logged_only),
                 len(total), _summary(logged_only, ids))
    components = {f"{name}/{key}": values for name, comps in raw.components.items() for key, values in comps.items()}
    return ScoreResult(total=total, valid=valid, rewards=per_reward, components=components, errors=errors)


def _summary(errors: dict[int, str], ids: Optional[Any]) -> str:
    """Errors grouped by reason (a dead server gives every sample the same one), a few samples named each."""
    by_reason: dict[str, list[str]] = {}
    for i, why in errors.items():
        by_reason.setdefault(why, []).append(f"{i} (id {ids[i]!r})" if isinstance(ids, PER_SAMPLE) else str(i))
    parts = []
    for why, samples in list(by_reason.items())[:_LOGGED]:
        more = f" and {len(samples) - _LOGGED} more" if len(samples) > _LOGGED else ""
        parts.append(f"{why} [sample {', '.join(samples[:_LOGGED])}{more}]")
    if len(by_reason) > _LOGGED:
        parts.append(f"and {len(by_reason) - _LOGGED} other reasons")
    return "; ".join(parts)


def score_batch(
    rewards: Mapping[str, Callable],
    batch: Mapping[str, Any],
    weights: Optional[Mapping[str, float]] = None,
    normalize: Optional[Mapping[str, bool]] = None,
) -> ScoreResult:
    """Score the batch with every reward and combine: `score_rewards`, then `combine_scores`."""
    return combine_scores(score_rewards(rewards, batch), weights, normalize, ids=batch.get("id"))


def _zscore(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    if not valid.any():
        return np.zeros_like(x)
    # Population std (ddof=0): the batch is the whole population being ranked, not a sample of one.
    mean, std = x[valid].mean(), x[valid].std()
    return np.zeros_like(x) if std < STD_FLOOR else (x - mean) / std


def combine(
    components: Mapping[str, np.ndarray], weights: Mapping[str, float], normalize: Mapping[str, bool]
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted sum of reward components, each optionally z-normalized over the valid samples
    first, so that rewards on different scales (WER in [0, 1], MOS in [1, 5]) combine by weight.

    Returns (total, valid): a sample is valid when every weighted component is finite; invalid samples
    get total NaN and take no part in any component's mean or std. A component of weight 0 (logged, not
    trained on, e.g. the realtime rule check) adds nothing and never invalidates a sample: a check that
    cannot read a reply (an empty text part) must not take that reply out of training, where the rewards
    that count can score it. Only where every weight is 0 do all components decide.
    """
    if not components:
        raise ValueError("combine: no reward components; configure at least one reward")
    missing = [k for k in components if k not in weights or k not in normalize]
    if missing:
        raise ValueError(f"combine: no weight or normalize flag for {missing}; give both for every reward")
    arrays = {k: np.asarray(v, dtype=float) for k, v in components.items()}
    sizes = {k: a.shape for k, a in arrays.items()}
    if len(set(sizes.values())) != 1 or any(len(shape) != 1 for shape in sizes.values()):
        raise ValueError(f"combine: components must be 1-D arrays of one length; got shapes {sizes}")
    counted = {k: a for k, a in arrays.items() if weights[k] != 0} or arrays
    valid = np.logical_and.reduce([np.isfinite(a) for a in counted.values()])
    total = np.zeros(len(valid))
    for k, x in counted.items():
        scaled = _zscore(x, valid) if normalize[k] else x
        total += weights[k] * np.where(valid, scaled, 0.0)
    total[~valid] = math.nan
    return total, valid
