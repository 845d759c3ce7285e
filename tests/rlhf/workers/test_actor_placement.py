"""Where an online run's actors go (rlhf/workers/placement.py): the layouts' bundles, the check against
the cluster, and real Ray placement groups on logical GPUs (`ray.init(num_gpus=...)` on this CPU
machine), which show which actors share a GPU and that a one-GPU machine schedules."""
from __future__ import annotations

import time

import pytest

from speechrl.rlhf.core.config import RecipeError, load_recipe
from speechrl.rlhf.workers.placement import check_fits, plan, release, reserve

pytestmark = pytest.mark.ray


def recipe(*overrides):
    return load_recipe("asr/grpo", list(overrides))


def node(cpus, gpus=0):
    return {"CPU": cpus, "GPU": gpus}


def test_colocated_shares_one_gpu_and_separate_gives_each_its_own():
    colocated = plan(recipe("ray.layout=colocated", "rollout.num_workers=2"), cluster_gpus=1)
    assert colocated.bundles == [{"GPU": 1, "CPU": 3}]
    assert colocated.policies[0]["num_gpus"] + sum(e["num_gpus"] for e in colocated.engines) == pytest.approx(1)
    assert {colocated.policies[0]["bundle"], *(e["bundle"] for e in colocated.engines)} == {0}
    # two trainer ranks: a GPU each, shared with the engines dealt round them, each GPU filled exactly
    ranks = plan(recipe("ray.layout=colocated", "rollout.num_workers=3", "train.num_ranks=2"), cluster_gpus=2)
    assert ranks.bundles == [{"GPU": 1, "CPU": 3}, {"GPU": 1, "CPU": 2}]
    assert [p["bundle"] for p in ranks.policies] == [0, 1] and [e["bundle"] for e in ranks.engines] == [0, 1, 0]
    for g in (0, 1):
        assert sum(a["num_gpus"] for a in (*ranks.policies, *ranks.engines) if a["bundle"] == g) == pytest.approx(1)

    separate = plan(recipe("ray.layout=separate", "rollout.num_workers=2", "rollout.tensor_parallel_size=2"), 8)
    assert separate.bundles == [{"GPU": 1, "CPU": 1}, {"GPU": 2, "CPU": 1}, {"GPU": 2, "CPU": 1}]
    assert [e["bundle"] for e in separate.engines] == [1, 2] and separate.engines[0]["num_gpus"] == 2
    separate = plan(recipe("ray.layout=separate", "rollout.num_workers=1", "train.num_ranks=3"), 8)
    assert separate.bundles == [{"GPU": 1, "CPU": 1}] * 4 and [e["bundle"] for e in separate.engines] == [3]
    assert [(p["bundle"], p["num_gpus"]) for p in separate.policies] == [(0, 1), (1, 1), (2, 1)]
    # evaluating a checkpoint on the engines: no bundle kept for a policy worker that never starts
    assert plan(recipe("ray.layout=separate", "rollout.num_workers=1"), 8, policy=False).bundles == [{"GPU": 1, "CPU": 1}]

    cpu = plan(recipe("ray.layout=separate", "rollout.num_workers=2"), cluster_gpus=0)
    assert cpu.bundles == [{"CPU": 1}] * 3 and not cpu.on_gpu and not cpu.engines_sleep


def test_a_request_the_cluster_cannot_meet_names_what_is_missing():
    cfg = recipe("ray.layout=separate", "rollout.num_workers=1")
    with pytest.raises(RecipeError, match=r"ray.layout=separate: .* need 2 GPUs but the Ray cluster has 1; "
                                          r"use ray.layout=colocated"):
        check_fits(cfg, plan(cfg, 1), {"CPU": 8, "GPU": 1}, [node(8, 1)])
    # enough GPUs in all, but no node holds a tensor-parallel engine's two
    cfg = recipe("ray.layout=separate", "rollout.num_workers=1", "rollout.tensor_parallel_size=2")
    with pytest.raises(RecipeError, match=r"bundle 1 needs \{GPU: 2, CPU: 1\} on one node, but the largest node "
                                          r"has \{GPU: 1, CPU: 4\}"):
        check_fits(cfg, plan(cfg, 3), {"CPU": 12, "GPU": 3}, [node(4, 1)] * 3)
    with pytest.raises(RecipeError, match=r"colocated .* rollout.tensor_parallel_size must be 1 \(it is 2\)"):
        plan(recipe("ray.layout=colocated", "rollout.tensor_parallel_size=2"), 2)
    # rewards' own GPUs count too
    cfg = recipe("ray.layout=colocated", "rewards=[{name: asr_wer, resources: {num_gpus: 1}}]")
    with pytest.raises(RecipeError, match=r"need 2 GPUs \(\+1 for rewards' resources\)"):
        check_fits(cfg, plan(cfg, 1), {"CPU": 8, "GPU": 1}, [node(8, 1)])
    cfg = recipe("rollout.num_workers=3")
    with pytest.raises(RecipeError, match=r"need 4 CPUs but the Ray cluster has 2; set ray.num_cpus higher"):
        check_fits(cfg, plan(cfg, 0), {"CPU": 2}, [node(2)])


def probe_actor():
    """An actor standing in for one of the run's: where Ray put it and which GPUs it was given.
    Defined in a function so Ray ships the class by value (workers cannot import test modules)."""
    import ray

    class Probe:
        def where(self):
            ctx = ray.get_runtime_context()
            return ctx.get_node_id(), tuple(ray.get_gpu_ids()), ctx.get_placement_group_id()

    return ray.remote(Probe)


@pytest.fixture
def logical_gpus():
    """A local Ray cluster with 4 CPUs and `n` logical GPUs (no CUDA needed), shut down after."""
    import ray

    def start(n):
        ray.init(address="local", num_cpus=4, num_gpus=n, include_dashboard=False)

    yield start
    ray.shutdown()


def test_one_gpu_machine_schedules_colocated_and_separate_is_refused_before_anything_starts(logical_gpus):
    import ray

    logical_gpus(1)
    cfg = recipe("ray.layout=colocated", "rollout.num_workers=2", "ray.placement_timeout_s=30")
    placement = reserve(cfg)
    try:
        probe = probe_actor()
        actors = [probe.options(**placement.options(placement.policies[0])).remote()]
        actors += [probe.options(**placement.options(e)).remote() for e in placement.engines]
        where = ray.get([a.where.remote() for a in actors], timeout=60)
        assert {w[1] for w in where} == {(0,)}, "policy and both engines share the one GPU"
        assert {w[2] for w in where} == {placement.group.id.hex()}, "all inside the run's placement group"
        # the group holds the whole GPU: nothing else may take it meanwhile
        assert ray.available_resources().get("GPU", 0) == 0
    finally:
        release(placement)
    deadline = time.time() + 30  # Ray returns a removed group's resources asynchronously
    while ray.available_resources().get("GPU", 0) < 1 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("GPU", 0) == 1, "release gives the GPU back"
    with pytest.raises(RecipeError, match=r"need 2 GPUs but the Ray cluster has 1"):
        reserve(recipe("ray.layout=separate", "rollout.num_workers=1"))


def test_separate_layout_gives_the_policy_and_each_engine_a_gpu_of_its_own(logical_gpus):
    import ray

    logical_gpus(3)
    placement = reserve(recipe("ray.layout=separate", "rollout.num_workers=2"))
    try:
        probe = probe_actor()
        actors = [probe.options(**placement.options(o)).remote() for o in (*placement.policies, *placement.engines)]
        gpus = [w[1] for w in ray.get([a.where.remote() for a in actors], timeout=60)]
        assert sorted(g for ids in gpus for g in ids) == [0, 1, 2] and all(len(ids) == 1 for ids in gpus)
    finally:
        release(placement)


def test_a_group_that_never_becomes_ready_is_an_error_naming_what_is_free(logical_gpus):
    """Resources the cluster has but another job holds: the run stops after the timeout, no hang."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    logical_gpus(1)
    other_job = placement_group([{"GPU": 1}])
    ray.get(other_job.ready())
    try:
        with pytest.raises(RecipeError, match=r"was not ready after ray.placement_timeout_s=2 s; the cluster has "
                                              r"\{CPU: 4, GPU: 0\} free"):
            reserve(recipe("ray.layout=colocated", "ray.placement_timeout_s=2"))
    finally:
        remove_placement_group(other_job)
