"""The plug-in routes driving real GRPO runs (Ray + vLLM on a tiny backbone), 2 steps each:
a reward from an installed package found by entry point, and a reward server on loopback that is
killed mid-run (its samples are marked unscored; the run goes on)."""
from __future__ import annotations

import json
import math
import time
from importlib.metadata import distribution
from pathlib import Path

import pytest

from reward_test_utils import EXAMPLES, reward_server_process
from speechrl.rlhf.core.config import load_recipe
from speechrl.rlhf.trainers.online import OnlineRecipe, run_online

pytestmark = [pytest.mark.vllm, pytest.mark.ray]

SMALL = ["data.synthetic.num_utterances=40", "data.max_eval_examples=2",
         "rl.prompts_per_step=2", "rollout.sampling.n=4", "rollout.sampling.max_new_tokens=8",
         "eval_max_new_tokens=8", "rollout.kv_cache_gib=0.25", "train.batch_size=8", "ray.num_cpus=2", "rollout.num_workers=1",
         "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2"]
SAMPLES_PER_STEP = 2 * 4


@pytest.fixture(scope="module")
def base(tiny_overrides, tmp_path_factory):
    return [*tiny_overrides, *SMALL, f"run.output_dir={tmp_path_factory.mktemp('plugins-runs')}"]


def rows(cfg) -> list[dict]:
    path = Path(cfg.run.output_dir) / cfg.run.name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_installed_package_reward_drives_grpo(example_package, base):
    assert Path(distribution("speechrl-example-rewards").locate_file("custom_reward")).parent == example_package
    cfg = load_recipe(str(EXAMPLES / "custom_reward" / "recipe.yaml"), [*base, "run.name=package"])
    assert [r.name for r in cfg.rewards] == ["asr_wer", "length_match", "no_filler"]
    summary = run_online(cfg)
    steps = [r for r in rows(cfg) if "rewards/total" in r]
    assert [r["step"] for r in steps] == [1, 2] and summary["unscored samples (total)"] == 0
    for row in steps:
        # the package's components are logged beside the built-in's, and enter the total by weight
        for key in ("asr_wer/reward", "length_match/reward", "length_match/length_ratio", "no_filler/reward"):
            assert math.isfinite(row[f"rewards/{key}"]), key
        assert row["rewards/length_match/reward"] <= 0.0 and row["rewards/length_match/length_ratio"] >= 0.0
        expected = row["rewards/asr_wer/reward"] + 0.5 * row["rewards/length_match/reward"] \
            + 0.2 * row["rewards/no_filler/reward"]
        assert row["rewards/total"] == pytest.approx(expected, abs=1e-6)  # means of a weighted sum, all valid


def test_remote_reward_server_drives_grpo_and_its_death_marks_samples(base, monkeypatch):
    monkeypatch.setenv("SPEECHRL_REWARD_TOKEN", "e2e-token")  # read by the server and, through Ray, the client
    scores, original = [], OnlineRecipe.score
    with reward_server_process("asr_wer") as (server, url):
        def kill_server_before_step_2(self, *args, **kwargs):
            if len(scores) == 1:
                server.kill()
                server.wait(10)
            began = time.monotonic()
            scores.append((original(self, *args, **kwargs), time.monotonic() - began))
            return scores[-1][0]

        monkeypatch.setattr(OnlineRecipe, "score", kill_server_before_step_2)
        cfg = load_recipe(str(EXAMPLES / "remote_reward" / "recipe.yaml"),
                          [*base, "run.name=remote", f"rewards.0.kwargs.url={url}", "rewards.0.kwargs.timeout_s=2"])
        summary = run_online(cfg)
    (alive, _), (dead, dead_seconds) = scores
    assert alive.valid.all() and len(alive.total) == SAMPLES_PER_STEP
    assert not dead.valid.any() and dead_seconds < 10  # refused connections: 3 attempts and backoff, no hang
    assert set(dead.errors) == set(range(SAMPLES_PER_STEP))
    assert all(f"remote: {url}: ClientConnectorError" in why and "3 attempts" in why for why in dead.errors.values()), dead.errors
    unscored = {r["step"]: r["rewards/unscored"] for r in rows(cfg) if "rewards/unscored" in r}
    assert unscored == {1: 0, 2: SAMPLES_PER_STEP}
    assert summary["unscored samples (total)"] == SAMPLES_PER_STEP and summary["steps"] == 2
