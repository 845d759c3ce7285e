"""Rewards that declare resources in the recipe get Ray workers of their own, and score the same."""
from __future__ import annotations

import time

import numpy as np
import pytest

from reward_test_utils import EXAMPLES
from speechrl.rewards.worker import RewardWorker, make_reward_actor
from speechrl.rlhf.core.config import load_recipe

pytestmark = pytest.mark.ray

BATCH = {"completions": ["turn right", "go 10 meters", "stop stop stop stop", "", "back up"],
         "text": ["turn left", "go ten meters", "stop", "go", "back up"], "id": list("abcde"), "mode": "asr"}


def hosted_rewards(classifier, *overrides):
    """The rewards of the hosted-reward example recipe, as shipped, pointed at `classifier`."""
    return load_recipe(str(EXAMPLES / "hosted_reward" / "recipe.yaml"),
                       [f"rewards.1.kwargs.path={classifier}", *overrides]).rewards


def free(ray, resource):
    return ray.available_resources().get(resource, 0.0)


def wait_for(condition, timeout=30.0):
    end = time.monotonic() + timeout
    while not condition() and time.monotonic() < end:
        time.sleep(0.2)
    return condition()


@pytest.mark.parametrize("replicas", [1, 2])
def test_reward_with_resources_runs_on_its_own_workers(ray_cluster, text_classifier, replicas):
    ray = ray_cluster
    assert wait_for(lambda: free(ray, "CPU") == 3.0)
    memory_before = free(ray, "memory")
    specs = hosted_rewards(text_classifier, f"rewards.1.resources.replicas={replicas}")
    actor = make_reward_actor(specs)
    result = ray.get(actor.score.remote(BATCH), timeout=120)
    # each replica of hf_classifier holds the recipe's 1 CPU and 1 GiB; asr_wer shares a 0-CPU worker
    assert free(ray, "CPU") == 3.0 - replicas
    assert memory_before - free(ray, "memory") == pytest.approx(replicas * 2**30)
    expected = RewardWorker(specs).score(BATCH)  # everything in this process, one batch
    np.testing.assert_allclose(result.total, expected.total, rtol=1e-5)
    assert list(result.components) == list(expected.components)  # recipe order, whoever answered first
    for key in expected.components:
        np.testing.assert_allclose(result.components[key], expected.components[key], rtol=1e-5)
    assert result.valid.all() and result.metrics()["rewards/unscored"] == 0
    ray.kill(actor)


def test_more_than_the_cluster_has_fails_before_any_worker_starts(ray_cluster, text_classifier):
    with pytest.raises(ValueError, match=r"'hf_classifier': resources.num_gpus=1 per worker, but the Ray cluster has 0"):
        make_reward_actor(hosted_rewards(text_classifier, "rewards.1.resources.num_gpus=1"))
    with pytest.raises(ValueError, match=r"resources.num_cpus=8 per worker, but the Ray cluster has 3"):
        make_reward_actor(hosted_rewards(text_classifier, "rewards.1.resources.num_cpus=8"))


def test_unknown_reward_fails_before_any_worker_starts(ray_cluster):
    with pytest.raises(KeyError, match="unknown reward 'no_such_reward'"):
        make_reward_actor([{"name": "asr_wer"}, {"name": "no_such_reward", "resources": {"num_cpus": 1}}])


def test_bad_resources_are_rejected_when_the_recipe_loads(text_classifier):
    with pytest.raises(ValueError, match="replicas >= 1"):
        hosted_rewards(text_classifier, "rewards.1.resources.replicas=0")


def test_alias_lists_one_reward_twice():
    worker = RewardWorker([{"name": "asr_wer", "normalize": False},
                           {"name": "asr_wer", "alias": "asr_cer", "normalize": False, "kwargs": {"metric": "cer"}}])
    result = worker.score(BATCH)
    assert {"asr_wer/wer", "asr_cer/cer"} <= set(result.components)
    np.testing.assert_allclose(result.total, result.rewards["asr_wer"] + result.rewards["asr_cer"])
