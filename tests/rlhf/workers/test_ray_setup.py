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


def test_no_ray_address_starts_a_local_cluster_even_where_ray_start_left_one_behind(monkeypatch):
    """`ray start` writes its cluster's address to /tmp/ray/ray_current_cluster, and a plain ray.init()
    joins that cluster, even when it is gone. ray.address: null means a local cluster of the run's own."""
    import ray
    from ray._private import services

    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir=None: "127.0.0.1:1")  # a dead head
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        cfg = load_recipe("asr/grpo", ["ray.num_cpus=3", "rollout.num_workers=1"])
        assert start_ray(cfg) is True, "it started the cluster: the run shuts it down"
        assert ray.cluster_resources()["CPU"] == 3
        assert start_ray(cfg) is False, "Ray already up in this process: the run leaves it running"
    finally:
        ray.shutdown()

