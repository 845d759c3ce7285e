"""docs/rewards.md stays true: its listings are the example files the tests run, and its JSON
request, sent to a real server, gets the answer the guide shows."""
from __future__ import annotations

import json
import re
import urllib.request

import pytest

from reward_test_utils import REPO, serving
from speechrl.rewards.asr import AsrWerReward
from speechrl.rewards.serve import RewardServer
from speechrl.rewards.wire import decode_request

GUIDE = (REPO / "docs" / "rewards.md").read_text()


def block_after(marker: str) -> str:
    """The fenced block that follows `<!-- marker -->`."""
    match = re.search(rf"<!-- {re.escape(marker)} -->\n```\w*\n(.*?)```", GUIDE, re.S)
    assert match, f"docs/rewards.md has no block after <!-- {marker} -->"
    return match.group(1)


LISTED = re.findall(r"<!-- file: (\S+) -->", GUIDE)


def test_guide_lists_all_three_routes():
    assert {"examples/custom_reward/recipe.yaml", "examples/hosted_reward/recipe.yaml",
            "examples/remote_reward/recipe.yaml"} <= set(LISTED)


@pytest.mark.parametrize("path", LISTED)
def test_listing_is_the_file(path):
    assert block_after(f"file: {path}") == (REPO / path).read_text(), f"docs/rewards.md's copy of {path} is stale"


def test_request_example_gets_the_answer_shown():
    request, shown = block_after("request"), json.loads(block_after("response"))
    batch = decode_request(request.encode())
    assert batch["sample_rate"] == 16000 and len(batch["audio"][0]) == 8 and batch["audio"][1] is None
    with serving(RewardServer("asr_wer", AsrWerReward(), None, 2**20, 1, 4)) as url:
        req = urllib.request.Request(url + "/v1/score", request.encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            answer = json.loads(r.read())
    assert answer["errors"] == shown["errors"]
    for key, values in shown["scores"].items():
        assert answer["scores"][key] == values, key
