"""Rollout workers as Ray actors: global order across workers, weight sync, a dead worker."""
from __future__ import annotations

import time

import pytest
import torch

from speechrl.rlhf.model.backbone import hub_state_dict, load_backbone
from speechrl.rlhf.core.config import RolloutConfig

pytestmark = [pytest.mark.vllm, pytest.mark.ray]
SR = 16000
SAMPLING = dict(n=2, temperature=1.0, top_p=1.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def workers(tiny_backbone_dir):
    ray = pytest.importorskip("ray")
    from speechrl.rollouts.engine import make_rollout_workers

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    start = time.perf_counter()
    handles = make_rollout_workers(str(tiny_backbone_dir), RolloutConfig(kv_cache_gib=0.25), num_workers=2, seed=0)
    print(f"\n2 Ray rollout workers up: {time.perf_counter() - start:.1f} s")
    yield handles
    ray.shutdown()


def test_engines_compute_on_their_share_of_the_cores(workers):
    """A Ray actor starts torch with one thread (OMP_NUM_THREADS=1); each engine is given its share."""
    import os

    import ray

    threads = ray.get([w.__ray_call__.remote(lambda self: torch.get_num_threads()) for w in workers])
    assert threads == [max(1, (os.cpu_count() or 1) // len(workers))] * len(workers)


def test_generate_across_keeps_global_order(workers, make_requests, tiny_backbone_dir):
    from speechrl.rollouts.engine import generate_across

    requests = make_requests(5)  # 3 + 2: uneven split
    start = time.perf_counter()
    samples = generate_across(workers, requests, seed=11, **SAMPLING)
    print(f"\ngenerate_across, 5 prompts x 2 on 2 workers: {time.perf_counter() - start:.2f} s")
    assert [(s.prompt_index, s.sample_index) for s in samples] == [(i, j) for i in range(5) for j in range(2)]
    processor = load_backbone(tiny_backbone_dir).processor
    for s in samples:
        req = requests[s.prompt_index]
        assert s.metadata == req.metadata
        # clips differ in length, so a misplaced sample shows in its expanded prompt ids
        assert s.prompt_ids == list(processor(text=[req.prompt], audio=[req.audio], sampling_rate=SR)["input_ids"][0])
    # per-request seeds follow the global index: one worker samples what two did
    alone = generate_across(workers[:1], requests, seed=11, **SAMPLING)
    assert [s.completion_ids for s in alone] == [s.completion_ids for s in samples]


def test_an_engine_seed_makes_a_call_sample_the_same_whatever_came_before(workers, make_requests):
    """What an exact RL resume needs where per-request seeds fail (vLLM 0.32 on CPU, long prefills):
    reseeded per call, the engines sample a batch the same way after other work, or none."""
    from speechrl.rollouts.engine import generate_across

    ids = lambda samples: [s.completion_ids for s in samples]  # noqa: E731
    requests = make_requests(3)
    first = generate_across(workers, requests, engine_seed=5, **SAMPLING)
    generate_across(workers, make_requests(5), **SAMPLING)  # moves the engines' generators on
    assert ids(generate_across(workers, requests, engine_seed=5, **SAMPLING)) == ids(first)
    assert ids(generate_across(workers, requests, engine_seed=6, **SAMPLING)) != ids(first)
    # worker k is reseeded with engine_seed + k: its share does not sample like worker 0's
    assert ids(generate_across(workers[1:], requests[2:], engine_seed=6, **SAMPLING)) == \
        ids(generate_across(workers, requests, engine_seed=5, **SAMPLING))[2 * SAMPLING["n"]:]


def test_object_store_transport_syncs_every_worker(workers, make_requests, tiny_backbone_dir):
    from speechrl.rollouts.engine import generate_across
    from speechrl.rollouts.sync import TRANSPORTS

    backbone = load_backbone(tiny_backbone_dir)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in backbone.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    requests = make_requests(4)
    expected = []
    for req in requests:
        inputs = backbone.processor(text=[req.prompt], audio=[req.audio], sampling_rate=SR, return_tensors="pt")
        with torch.no_grad():
            ids = backbone.model.generate(**inputs, do_sample=False, max_new_tokens=12)
        expected.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    greedy = dict(n=1, temperature=0.0, top_p=1.0, max_new_tokens=12)
    assert [s.completion_ids for s in generate_across(workers, requests, **greedy)] != expected

    start = time.perf_counter()
    TRANSPORTS.get("object_store")().send(hub_state_dict(backbone.model.state_dict().items()), workers)
    print(f"\nobject_store sync to 2 workers: {time.perf_counter() - start:.2f} s")
    assert [s.completion_ids for s in generate_across(workers, requests, **greedy)] == expected


def test_dead_worker_raises_naming_it(workers, make_requests, tiny_backbone_dir):
    import ray

    from speechrl.rollouts.engine import RolloutWorkerDied, generate_across

    ray.kill(workers[1])
    start = time.perf_counter()
    with pytest.raises(RolloutWorkerDied, match="rollout worker 1 died") as info:
        generate_across(workers, make_requests(4), **SAMPLING)
    assert info.value.worker_index == 1
    assert time.perf_counter() - start < 30
    # and a weight sync names it too, so the driver replaces it and syncs again (OnlineRecipe.sync)
    from speechrl.rollouts.sync import TRANSPORTS

    with pytest.raises(RolloutWorkerDied, match="rollout worker 1 died during the weight sync") as info:
        TRANSPORTS.get("object_store")().send(hub_state_dict(load_backbone(tiny_backbone_dir).model.state_dict().items()),
                                              workers)
    assert info.value.worker_index == 1
