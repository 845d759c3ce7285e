"""What a reward is, in code: the call, the "no score" marker, and running sync and async rewards alike.

A reward is called once per batch with every batch key as a keyword argument and returns one value
per completion: a list of floats, or a dict of named lists with the score under "reward". A value
of None, NaN or `Unscored("why")` means "no score for this sample". An `async def` reward (or a
class whose `__call__` is one) returns the same thing from a coroutine. docs/rewards.md is the guide.
"""
from __future__ import annotations

import asyncio
import inspect
import math
from typing import Any, Callable, Mapping, Protocol, Sequence, Union

Scores = Union[Sequence[Union[float, None]], Mapping[str, Sequence[Union[float, None]]]]


class Reward(Protocol):
    """The call every reward answers; `columns` holds everything else the batch carries."""

    def __call__(self, completions: list[str], **columns: Any) -> Scores: ...


class Unscored(float):
    """NaN that says why: `Unscored("server timed out")` marks a sample unscored and the reason
    reaches the logs and `ScoreResult.errors`, where a bare NaN could only say "returned nan"."""

    reason: str

    def __new__(cls, reason: str) -> "Unscored":
        value = super().__new__(cls, math.nan)
        value.reason = str(reason)
        return value

    def __reduce__(self):  # keep the reason across Ray's pickling
        return Unscored, (self.reason,)

    def __repr__(self) -> str:
        return f"Unscored({self.reason!r})"


async def _wait(awaitable):
    return await awaitable


def call_reward(fn: Callable, batch: Mapping[str, Any]) -> Any:
    """fn(**batch), awaited to completion when fn is async.

    Called from plain threads (the reward worker, the HTTP server's scoring threads), where no
    event loop runs, so each async call gets a fresh loop of its own.
    """
    out = fn(**batch)
    return asyncio.run(_wait(out)) if inspect.isawaitable(out) else out
