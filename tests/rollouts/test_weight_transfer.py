"""vLLM's weight transfer from the policy worker to two real engines (rollout.weight_transport=gloo, the
CPU backend: vLLM's NCCL engines with a gloo communicator, rollouts/weight_transfer.py).

The policy worker runs in this process and trains on the engines' own samples; after each sync both
engines must decode what the trained policy decodes. Order matters: each test continues from the
weights the one before it synced.
"""
from __future__ import annotations

import time

import pytest

from speechrl.rlhf.core.config import RecipeError, RolloutConfig, load_recipe

pytestmark = [pytest.mark.vllm, pytest.mark.ray]
SR = 16000
GREEDY = dict(n=1, temperature=0.0, top_p=1.0, max_new_tokens=12)
ROLLOUT = RolloutConfig(kv_cache_gib=0.25, max_model_len=512, num_workers=2, threads_per_worker=1,
                        weight_transport="gloo")


@pytest.fixture(scope="module")
def engines(tiny_backbone_dir):
    ray = pytest.importorskip("ray")
    from speechrl.rollouts.engine import make_rollout_workers

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    start = time.perf_counter()
    workers = make_rollout_workers(str(tiny_backbone_dir), ROLLOUT, num_workers=2, seed=0, weight_transfer="gloo")
    print(f"\ntwo engines with gloo weight transfer up: {time.perf_counter() - start:.1f} s")
    yield workers
    ray.shutdown()


@pytest.fixture(scope="module")
def policy(make_policy):
    return make_policy()


@pytest.fixture(scope="module")
def transport():
    from speechrl.rollouts.sync import TRANSPORTS

    return TRANSPORTS.get("gloo")(ROLLOUT)


def generate(workers, requests, **kw):
    from speechrl.rollouts.engine import generate_across

    return generate_across(workers, requests, **kw)


def each_engine_decodes_as_the_policy(engines, policy, requests, greedy) -> list[list[int]]:
    outputs = [[s.completion_ids for s in generate([w], requests, **GREEDY)] for w in engines]
    samples = generate(engines[:1], requests, **GREEDY)
    expected = greedy(policy, requests, samples, GREEDY["max_new_tokens"])
    assert all(out == expected for out in outputs), "every engine holds the policy's weights"
    return expected


def test_the_policy_sends_its_weights_to_both_engines(engines, policy, transport, make_requests,
                                                      trainer_greedy, train_step):
    import ray

    requests = make_requests(4)
    before = [s.completion_ids for s in generate(engines, requests, **GREEDY)]
    train_step(engines, policy, requests, seed=1)
    start = time.perf_counter()
    transport.sync(policy, engines)  # forms the group (3 ranks: the policy, then one per engine), then sends
    print(f"\nfirst gloo sync (group formed): {time.perf_counter() - start:.2f} s")
    changed = each_engine_decodes_as_the_policy(engines, policy, requests, trainer_greedy) != before
    assert changed, "the step changes greedy output"
    joined = ray.get([w.__ray_call__.remote(lambda self: self._transfer) for w in engines])
    assert joined == [{"joined": True, "updating": False}] * 2
    # the engines took ranks 1 and 2 of one group: each got its own offset from the client
    from speechrl.rollouts.weight_transfer import EnginesClient

    assert EnginesClient(engines, [1, 1]).offsets == [1, 2] and EnginesClient(engines, [2, 2]).offsets == [1, 3]


def test_later_syncs_reuse_the_group_and_track_every_step(engines, policy, transport, make_requests,
                                                          trainer_greedy, train_step):
    requests = make_requests(4)
    group = policy.transfer
    for seed in (2, 3):
        previous = [s.completion_ids for s in generate(engines, requests, **GREEDY)]
        train_step(engines, policy, requests, seed=seed)
        start = time.perf_counter()
        transport.sync(policy, engines)
        print(f"gloo sync: {time.perf_counter() - start:.2f} s")
        assert each_engine_decodes_as_the_policy(engines, policy, requests, trainer_greedy) != previous
    assert policy.transfer is group, "the same engines: no new group"


def test_a_dead_engine_is_named_and_its_replacement_joins_a_new_group(engines, policy, transport, make_requests,
                                                                      tiny_backbone_dir, trainer_greedy, train_step):
    import ray

    from speechrl.rollouts.engine import RolloutWorkerDied, make_rollout_workers

    requests = make_requests(3)
    ray.kill(engines[1])
    train_step(engines[:1], policy, requests, seed=4)
    with pytest.raises(RolloutWorkerDied) as died:
        transport.sync(policy, engines)
    assert died.value.worker_index == 1 and "weight sync" in str(died.value)
    engines[1] = make_rollout_workers(str(tiny_backbone_dir), ROLLOUT, num_workers=1, seed=7,
                                      weight_transfer="gloo")[0]
    transport.sync(policy, engines)  # a new group with the survivor and the replacement
    each_engine_decodes_as_the_policy(engines, policy, requests, trainer_greedy)


def test_weight_transfer_is_refused_where_it_cannot_work():
    from types import SimpleNamespace

    from speechrl.rollouts.sync import TRANSPORTS

    cpu = SimpleNamespace(on_gpu=False, layout="separate")
    plain = load_recipe("asr/grpo")
    for name in ("nccl", "ipc"):
        with pytest.raises(RecipeError, match=rf"weight_transport={name} needs CUDA GPUs.*use rollout.weight_transport=gloo"):
            TRANSPORTS.get(name)(plain.rollout).check(plain, cpu)
    TRANSPORTS.get("gloo")(plain.rollout).check(plain, cpu)  # the CPU backend fits
    chosen = TRANSPORTS.get("transfer")(plain.rollout)
    chosen.check(plain, cpu)
    assert chosen.backend == "gloo", "on CPU, `transfer` is the gloo backend"
    async_ = load_recipe("asr/grpo", ["rollout.async.enabled=true", "rollout.weight_transport=gloo"])
    with pytest.raises(RecipeError, match="async rollouts.*rollout.weight_transport=object_store with async"):
        TRANSPORTS.get("gloo")(async_.rollout).check(async_, cpu)
