"""The reward call in its forms: sync, async, Unscored with a reason; one warning per batch."""
import asyncio
import logging
import math
import pickle

import numpy as np

from speechrl.rewards.api import Unscored, call_reward
from speechrl.rewards.combine import score_batch

BATCH = {"completions": ["a", "bb", "", "dddd"], "id": ["u0", "u1", "u2", "u3"], "mode": "asr"}


def length(completions, **columns):
    return [float(len(c)) for c in completions]


async def async_length(completions, **columns):
    await asyncio.sleep(0)  # a real suspension: the coroutine must be driven to the end
    return [float(len(c)) for c in completions]


class AsyncWithReason:
    async def __call__(self, completions, **columns):
        await asyncio.sleep(0)
        return {"reward": [Unscored("empty completion") if not c else 1.0 for c in completions],
                "chars": [len(c) for c in completions]}


def test_async_reward_scores_like_its_sync_twin():
    sync = score_batch({"r": length}, BATCH)
    asynchronous = score_batch({"r": async_length}, BATCH)
    np.testing.assert_array_equal(asynchronous.total, sync.total)
    np.testing.assert_array_equal(asynchronous.total, [1.0, 2.0, 0.0, 4.0])


def test_unscored_reason_reaches_errors_and_survives_pickling():
    value = pickle.loads(pickle.dumps(Unscored("server timed out")))
    assert math.isnan(value) and value.reason == "server timed out"
    result = score_batch({"judge": AsyncWithReason()}, BATCH)
    assert result.valid.tolist() == [True, True, False, True]
    assert result.errors == {2: "judge: empty completion"}
    np.testing.assert_array_equal(result.components["judge/chars"], [1, 2, 0, 4])


def test_call_reward_awaits_only_awaitables():
    assert call_reward(length, {"completions": ["xy"]}) == [2.0]
    assert call_reward(async_length, {"completions": ["xy"]}) == [2.0]


def test_many_unscored_samples_make_one_warning(caplog):
    batch = {"completions": [""] * 10, "id": [f"u{i}" for i in range(10)]}
    with caplog.at_level(logging.WARNING):
        result = score_batch({"judge": AsyncWithReason(), "len": length}, {**batch, "completions": [""] * 9 + ["x"]})
    lines = [r.getMessage() for r in caplog.records if "have no reward" in r.getMessage()]
    # one reason, given once, with the first samples named
    assert lines == ["9 of 10 samples have no reward: judge: empty completion "
                     "[sample 0 (id 'u0'), 1 (id 'u1'), 2 (id 'u2') and 6 more]"]
    assert result.metrics()["rewards/unscored"] == 9
