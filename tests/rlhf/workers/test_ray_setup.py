"""The GRPO driver's checks that need no engine: they must fail before anything starts."""
from __future__ import annotations

import pytest

from speechrl.rlhf.core.config import RecipeError, load_recipe
from speechrl.rlhf.workers.ray_setup import start_ray


def test_too_few_ray_cpus_for_the_actors_is_an_error_not_a_hang():
    import ray

    cfg = load_recipe("asr/grpo", ["ray.num_cpus=2", "rollout.num_workers=2"])
    with pytest.raises(RecipeError, match=r"ray.num_cpus=2 .* needing 3 CPUs .* set ray.num_cpus>=3"):
        start_ray(cfg)
    assert not ray.is_initialized()


def test_cpus_reserved_by_rewards_count_too():
    cfg = load_recipe("asr/grpo", ["ray.num_cpus=3", "rollout.num_workers=1",
                                   "rewards=[{name: asr_wer, resources: {num_cpus: 1, replicas: 2}}]"])
    with pytest.raises(RecipeError, match=r"needing 4 CPUs .* 2 for rewards"):
        start_ray(cfg)
