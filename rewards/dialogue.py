"""Realtime-dialogue rewards that need no judge: reply length, latency, and a team's own classifier.

`reply_length` and `latency` are 0 inside a target and fall linearly outside it; `emotion` wraps a
classifier named by dotted path. Their columns and settings are in docs/rewards.md.
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Callable, Optional, Sequence

from speechrl.rewards.api import Unscored

UNITS = ("words", "seconds")


def _shortfall(value: float, low: Optional[float], high: Optional[float]) -> float:
    """How far `value` lies outside [low, high], relative to the bound it crossed."""
    if low is not None and value < low:
        return (low - value) / max(low, 1e-9)
    if high is not None and value > high:
        return (value - high) / max(high, 1e-9)
    return 0.0


class ReplyLengthReward:
    """reward = -min(cap, distance outside [min, max] / the bound crossed): 0 in range, never below -cap.

    So a reply half again as long as `max` (or half as long as `min`) scores -0.5. Unit "seconds" reads
    a `reply_seconds` column where the driver gives one (it wins over `audio`), else the duration of the
    spoken reply in `audio`; unit "words" counts the words of `completions`.
    """

    def __init__(self, unit: str = "words", min: Optional[float] = None, max: Optional[float] = None,
                 cap: float = 1.0):
        if unit not in UNITS:
            raise ValueError(f"reply_length: unit={unit!r}; use one of {', '.join(UNITS)}")
        if min is None and max is None:
            raise ValueError("reply_length: give min, max or both (the target range, in `unit`)")
        if min is not None and max is not None and min > max:
            raise ValueError(f"reply_length: min={min} > max={max}")
        self.unit, self.low, self.high, self.cap = unit, min, max, cap

    def __call__(self, completions: list[str], **columns: Any) -> dict[str, list[float]]:
        lengths = [len(c.split()) for c in completions] if self.unit == "words" else self._seconds(columns, len(completions))
        rewards = [Unscored(f"reply_length: no {self.unit} for this reply") if x is None or math.isnan(x)
                   else -min(self.cap, _shortfall(x, self.low, self.high)) for x in lengths]
        return {"reward": rewards, self.unit: [math.nan if x is None else float(x) for x in lengths]}

    @staticmethod
    def _seconds(columns: dict[str, Any], n: int) -> list[Optional[float]]:
        if columns.get("reply_seconds") is not None:
            return [None if s is None else float(s) for s in columns["reply_seconds"]]
        if columns.get("audio") is None:
            raise KeyError("reply_length: unit 'seconds' needs the spoken reply as `audio` (with `sample_rate`) "
                           "or a `reply_seconds` column; neither is in the batch")
        rate = columns.get("sample_rate")
        if not rate:
            raise KeyError("reply_length: the batch has `audio` but no `sample_rate`")
        return [None if a is None else len(a) / rate for a in columns["audio"]]


class LatencyReward:
    """reward = -min(cap, (latency - budget) / budget) beyond the budget, 0 within it.

    Reads `column` (default `ttfa_ms`: ms from the end of the user's turn to the first audio token).
    Wall-clock latency is noisy (load, batching): where the driver can, point `column` at a deterministic
    proxy, e.g. the tokens before the first audio token, with a budget in the same unit.
    """

    def __init__(self, budget: float = 300.0, column: str = "ttfa_ms", cap: float = 1.0):
        if budget <= 0:
            raise ValueError(f"latency: budget must be > 0, got {budget}")
        self.budget, self.column, self.cap = budget, column, cap

    def __call__(self, completions: list[str], **columns: Any) -> dict[str, list[float]]:
        if columns.get(self.column) is None:
            raise KeyError(f"latency: the batch has no {self.column!r} column; the realtime driver must fill it "
                           f"(or set kwargs.column to the column that holds the latency)")
        values = [None if v is None else float(v) for v in columns[self.column]]
        rewards = [Unscored(f"latency: no {self.column} for this reply") if v is None or math.isnan(v)
                   else -min(self.cap, max(0.0, v - self.budget) / self.budget) for v in values]
        return {"reward": rewards, self.column: [math.nan if v is None else v for v in values],
                "over_budget": [math.nan if v is None else float(v > self.budget) for v in values]}


def load_callable(path: str, kwargs: Optional[dict] = None) -> Callable:
    """The object at "pkg.module:attr"; a class is instantiated with `kwargs`."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"emotion: classifier {path!r} must be a 'pkg.module:name' path")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"emotion: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if inspect.isclass(obj):
        return obj(**(kwargs or {}))
    if kwargs:
        raise TypeError(f"emotion: classifier_kwargs go to a class's constructor; {path} is a function")
    return obj


class EmotionReward:
    """A team's classifier as a reward: reward = P(target labels) - P(forbidden labels), in [-1, 1].

    `classifier` ("pkg.module:name", a function or a class) is called once per batch as
    classifier(items, sample_rate=...) -> [{label: probability}], on waveforms or texts (docs/rewards.md).
    A sample without audio goes unscored; labels not returned count 0. Logged: `p_target`, `p_forbidden`.
    """

    def __init__(self, classifier: str, input: str = "audio", target: Sequence[str] | str = (),
                 forbidden: Sequence[str] | str = (), classifier_kwargs: Optional[dict] = None):
        if input not in ("audio", "text"):
            raise ValueError(f"emotion: input={input!r}; use 'audio' or 'text'")
        self.target = [target] if isinstance(target, str) else list(target)
        self.forbidden = [forbidden] if isinstance(forbidden, str) else list(forbidden)
        if not self.target and not self.forbidden:
            raise ValueError("emotion: give a target label, forbidden labels, or both")
        self.classify = load_callable(classifier, classifier_kwargs)
        self.input, self.name = input, classifier

    def __call__(self, completions: list[str], **columns: Any) -> dict[str, list[float]]:
        if self.input == "text":
            items, rate = list(completions), None
        else:
            if columns.get("audio") is None:
                raise KeyError("emotion: input 'audio' needs the spoken replies as the `audio` column")
            items, rate = list(columns["audio"]), columns.get("sample_rate")
        present = [i for i, x in enumerate(items) if x is not None]
        found = self.classify([items[i] for i in present], sample_rate=rate) if present else []
        if len(found) != len(present):
            raise ValueError(f"emotion: {self.name} returned {len(found)} results for {len(present)} inputs")
        probs: list[Optional[dict]] = [None] * len(items)
        for i, p in zip(present, found):
            probs[i] = p
        good = [math.nan if p is None else float(sum(p.get(k, 0.0) for k in self.target)) for p in probs]
        bad = [math.nan if p is None else float(sum(p.get(k, 0.0) for k in self.forbidden)) for p in probs]
        out = {"reward": [Unscored(f"emotion: no {self.input} to classify") if p is None else g - b
                          for p, g, b in zip(probs, good, bad)]}
        if self.target:
            out["p_target"] = good
        if self.forbidden:
            out["p_forbidden"] = bad
        return out
