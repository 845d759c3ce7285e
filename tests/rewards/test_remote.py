"""The `remote` reward against real servers on loopback: same scores as in process, bounded time
and marked samples when the server is slow or gone, clear errors when it refuses, and a load test."""
from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import urllib.request

import numpy as np
import pytest

from reward_test_utils import reward_server_process, serving
from speechrl.rewards.api import Unscored
from speechrl.rewards.asr import AsrWerReward
from speechrl.rewards.combine import score_batch
from speechrl.rewards.hosted import HfClassifierReward
from speechrl.rewards.remote import RemoteReward, RemoteRewardError
from speechrl.rewards.serve import RewardServer

TOKEN = "t0ken"
WORDS = "turn left right go stop ten meters forward back up down".split()


def make_batch(n: int, seed: int) -> dict:
    """n samples with distinct (hypothesis, reference) pairs, so every score is checkable."""
    rng = np.random.default_rng(seed)
    refs = [" ".join(rng.choice(WORDS, size=rng.integers(1, 6))) for _ in range(n)]
    hyps = [" ".join(rng.choice(WORDS, size=rng.integers(0, 6))) + f" w{seed}x{i}" for i in range(n)]
    return {"completions": hyps, "text": refs, "id": [f"{seed}-{i}" for i in range(n)], "mode": "asr"}


def server(reward, name="r", token=TOKEN, workers=1, max_pending=64):
    return RewardServer(name, reward, token, 2**24, workers, max_pending)


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("SPEECHRL_REWARD_TOKEN", TOKEN)


def test_remote_scores_equal_local_scores_across_chunks(token):
    batch = make_batch(10, seed=0)
    with serving(server(AsrWerReward(), "asr_wer")) as url:
        remote = RemoteReward(url, max_batch_size=3, max_concurrency=2)
        out = score_batch({"remote": remote}, batch)
    local = score_batch({"remote": AsrWerReward()}, batch)
    assert out.valid.all()
    for key in local.components:  # every component, in order: nothing lost, swapped or repeated
        np.testing.assert_array_equal(out.components[key], local.components[key])


def test_audio_reward_scores_the_same_remotely(token, audio_classifier, speech):
    clips = list(speech.values())
    batch = {"completions": ["a", "b", "c", "d"], "audio": [clips[0], clips[1], clips[1], clips[2]],
             "sample_rate": 16000}
    local = HfClassifierReward(str(audio_classifier), modality="audio")
    with serving(server(local, "hf_classifier")) as url:
        remote = RemoteReward(url, max_batch_size=2)
        out = score_batch({"q": remote}, batch)
    expected = local(**batch)
    assert out.valid.all() and len(set(np.round(expected, 4))) == 3  # three clips, three scores
    np.testing.assert_allclose(out.rewards["q"], expected, rtol=5e-3)  # 16-bit PCM on the wire


def test_slow_server_costs_bounded_time_and_marks_samples(token):
    def slow(completions, **columns):
        time.sleep(1.0)
        return [1.0] * len(completions)

    with serving(server(slow, workers=2)) as url:
        remote = RemoteReward(url, timeout_s=0.3, retries=1, backoff_s=0.05, max_batch_size=4, max_concurrency=2)
        began = time.monotonic()
        out = score_batch({"remote": remote}, make_batch(8, seed=1))
        elapsed = time.monotonic() - began
    # two chunks in parallel, 2 attempts of 0.3 s each plus one backoff of at most 0.05 s
    assert elapsed < 1.2, elapsed
    assert not out.valid.any() and out.metrics()["rewards/unscored"] == 8
    assert all("timed out after 0.3 s (2 attempts" in why for why in out.errors.values()), out.errors


def test_dead_server_marks_every_sample_with_the_reason(token, caplog):
    with serving(server(AsrWerReward(), "asr_wer")) as url:
        remote = RemoteReward(url, timeout_s=1.0, retries=2, backoff_s=0.05)
    began = time.monotonic()  # the server is gone now: connections are refused
    out = asyncio.run(remote(**make_batch(5, seed=2)))
    assert time.monotonic() - began < 1.0
    assert all(isinstance(v, Unscored) and "Connect" in v.reason and url in v.reason for v in out["reward"])
    with caplog.at_level(logging.WARNING):
        result = score_batch({"remote": remote}, make_batch(5, seed=2))
    assert result.metrics()["rewards/unscored"] == 5
    assert f"5 of 5 samples have no reward: remote: {url}: ClientConnectorError" in caplog.text
    assert "(3 attempts in" in caplog.text


def test_wrong_token_stops_with_what_to_set(monkeypatch):
    monkeypatch.setenv("SPEECHRL_REWARD_TOKEN", "not-the-token")
    with serving(server(AsrWerReward(), "asr_wer")) as url:
        remote = RemoteReward(url)  # /health is open: the start-up check passes
        with pytest.raises(RemoteRewardError, match="answered 401.*token_env"):
            asyncio.run(remote(**make_batch(3, seed=3)))
        with pytest.raises(RuntimeError, match="failed on every sample.*answered 401.*token_env"):
            score_batch({"remote": remote}, make_batch(3, seed=3))


def test_no_server_at_start_up_is_a_clear_error(token):
    with serving(server(AsrWerReward())) as url:
        pass
    with pytest.raises(ConnectionError, match=f"no reward server answers at {url}/health.*serve-reward"):
        RemoteReward(url, timeout_s=0.5, retries=0)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="http://"):
        RemoteReward("127.0.0.1:8100")
    with pytest.raises(ValueError, match="timeout_s > 0"):
        RemoteReward("http://127.0.0.1:1", timeout_s=0)


def test_load_from_several_rollout_workers_loses_and_duplicates_nothing(token):
    """8 clients (rollout workers' worth) x 5 batches x 32 samples against one server process, 4
    requests in flight per client: every score must come back once, to its own sample."""
    clients, batches, n = 8, 5, 32
    with reward_server_process("asr_wer", "--workers", "2", "--max-pending", "64") as (_, url):
        remote = RemoteReward(url, timeout_s=30, max_batch_size=8, max_concurrency=4)
        results, errors = {}, []

        def client(c):
            try:
                for b in range(batches):
                    batch = make_batch(n, seed=100 * c + b)
                    results[(c, b)] = (batch, asyncio.run(remote(**batch)))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        began = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        elapsed = time.monotonic() - began
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            health = json.loads(r.read())
    assert not errors, errors
    assert len(results) == clients * batches
    local = AsrWerReward()
    for batch, out in results.values():
        expected = local(**batch)
        assert out["reward"] == expected["reward"] and out["wer"] == expected["wer"]
        assert not any(math.isnan(v) for v in out["reward"])
    # each sample scored exactly once on the server: no retries happened, none were lost
    assert health["samples"] == clients * batches * n and health["requests"] == clients * batches * n // 8
    print(f"load test: {clients * batches * n} samples in {health['requests']} requests, {elapsed:.2f} s")
