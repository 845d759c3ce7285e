"""The reward server over real HTTP on loopback: auth, limits, malformed requests, busy, the CLI."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from reward_test_utils import SPEECHRL, reward_server_process, serving
from speechrl.rewards.asr import AsrWerReward
from speechrl.rewards.serve import RewardServer
from speechrl.rewards.wire import encode_request

TOKEN = "s3cret-token"
BATCH = {"completions": ["turn right", "go 10 meters", "stop"], "text": ["turn left", "go ten meters", None],
         "id": ["a", "b", "c"], "mode": "asr"}


def post(url, body: bytes, token: str | None = TOKEN, path="/v1/score"):
    """(status, JSON answer) of a POST."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, body, headers), timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get_health(url):
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.loads(r.read())


def make_server(reward=None, name="asr_wer", token=TOKEN, max_body_bytes=2**20, workers=1, max_pending=8):
    return RewardServer(name, reward or AsrWerReward(), token, max_body_bytes, workers, max_pending)


@pytest.fixture(scope="module")
def asr_server():
    server = make_server()
    with serving(server) as url:
        yield server, url


def test_scores_match_the_reward_in_process(asr_server):
    server, url = asr_server
    status, answer = post(url, encode_request(BATCH))
    local = AsrWerReward()(**BATCH)
    assert status == 200
    assert answer["scores"]["reward"][:2] == local["reward"][:2] and answer["scores"]["reward"][2] is None
    assert answer["scores"]["wer"][:2] == local["wer"][:2]
    assert answer["errors"] == {"2": "asr_wer returned nan"}
    health = get_health(url)
    assert health["status"] == "ok" and health["reward"] == "asr_wer" and health["samples"] >= 3


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x"])
def test_missing_or_wrong_token_is_401(asr_server, token):
    status, answer = post(asr_server[1], encode_request(BATCH), token=token)
    assert status == 401 and "Authorization: Bearer" in answer["error"]


def test_health_needs_no_token_and_tells_no_secrets(asr_server):
    assert TOKEN not in json.dumps(get_health(asr_server[1]))


@pytest.mark.parametrize("body, field", [
    (b'{"completions": ["a"', "not JSON"),
    (b'["a", "b"]', "JSON object"),
    (b'{"text": ["a"]}', "'completions'"),
    (b'{"completions": ["a", 3]}', "'completions'"),
    (b'{"completions": ["a", "b"], "text": ["a"]}', "'text': 1"),
    (b'{"completions": ["a", "b"], "audio": [null, "not base64!"]}', "'audio[1]'"),
    (b'{"completions": ["a"], "audio": ["' + base64.b64encode(b"RIFF garbage").decode().encode() + b'"]}',
     "'audio[0]'"),
    (b'{"completions": ["a"], "audio": "UklGRg=="}', "'audio'"),
    (b'{"completions": ["a"], "sample_rate": 16000}', "'sample_rate'"),
])
def test_malformed_request_is_400_naming_the_field(asr_server, body, field):
    status, answer = post(asr_server[1], body)
    assert status == 400 and field in answer["error"], answer


def test_body_over_the_limit_is_413():
    with serving(make_server(max_body_bytes=4096)) as url:
        small = encode_request(BATCH)
        big = encode_request({"completions": ["word " * 2000], "text": ["word"]})
        assert post(url, small)[0] == 200
        status, answer = post(url, big)
    assert status == 413 and "0.00390625 MiB" in answer["error"] and "max_batch_size" in answer["error"]


def test_broken_reward_is_500_with_its_message():
    with serving(make_server(lambda completions, **kw: [1.0], name="short")) as url:
        status, answer = post(url, encode_request(BATCH))
    assert status == 500 and "'short'" in answer["error"] and "shape (1,)" in answer["error"]


def test_requests_beyond_max_pending_get_503_at_once():
    release = threading.Event()

    def waits(completions, **columns):
        release.wait(10)
        return [0.0] * len(completions)

    with serving(make_server(waits, name="waits", max_pending=1)) as url:
        first = threading.Thread(target=post, args=(url, encode_request(BATCH)))
        first.start()
        while get_health(url)["pending"] < 1:
            time.sleep(0.01)
        began = time.monotonic()
        status, answer = post(url, encode_request(BATCH))
        elapsed = time.monotonic() - began
        release.set()
        first.join(10)
        assert status == 503 and "busy" in answer["error"] and elapsed < 2.0
        assert get_health(url)["pending"] == 0  # the first request finished normally


def test_audio_arrives_as_float_waveforms_at_its_rate(speech):
    seen = {}

    def records(completions, audio, sample_rate, **columns):
        seen.update(audio=audio, sample_rate=sample_rate)
        return [0.0] * len(completions)

    clip = speech["turn left"]
    batch = {"completions": ["x", "y", "z"], "audio": [clip, clip, None], "sample_rate": 16000}
    with serving(make_server(records, name="records")) as url:
        assert post(url, encode_request(batch))[0] == 200
    assert seen["sample_rate"] == 16000 and seen["audio"][2] is None
    assert seen["audio"][0].dtype == np.float32 and len(seen["audio"][0]) == len(clip)
    assert np.abs(seen["audio"][0] - clip).max() < 1e-4  # 16-bit PCM on the wire


@pytest.mark.skipif(SPEECHRL is None, reason="speechrl console script not installed")
@pytest.mark.parametrize("args, message", [
    (["no_such_reward"], "unknown reward 'no_such_reward'"),
    (["asr_wer", "metrc=cer"], "cannot build AsrWerReward"),
    (["asr_wer", "metric"], "key=value"),
    (["asr_wer", "--host", "0.0.0.0"], "refusing to listen on 0.0.0.0 without a token"),
])
def test_cli_refuses_to_start_with_a_clear_error(args, message):
    env = {k: v for k, v in os.environ.items() if k != "SPEECHRL_REWARD_TOKEN"}
    proc = subprocess.run([SPEECHRL, "serve-reward", *args, "--port", "0"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_cli_serves_a_registered_reward_with_kwargs():
    with reward_server_process("asr_wer", "metric=cer", env={"SPEECHRL_REWARD_TOKEN": TOKEN}) as (_, url):
        status, answer = post(url, encode_request(BATCH))
        assert post(url, encode_request(BATCH), token=None)[0] == 401
    assert status == 200
    assert answer["scores"]["reward"][:2] == AsrWerReward(metric="cer")(**BATCH)["reward"][:2]
