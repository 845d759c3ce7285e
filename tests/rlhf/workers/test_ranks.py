"""Several trainer ranks (train.num_ranks): two real Ray actors, a gloo process group, the policy sharded
with FSDP2. Their step is one rank's step on the same batch, and checkpoints move between rank counts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from speechrl.rlhf.algos.batch import TrainBatch
from speechrl.rlhf.workers.ranks import my_share


def test_every_rank_runs_as_many_passes_and_each_part_runs_once():
    parts = ["a", "b", "c"]
    shares = [my_share(parts, r, 2) for r in range(2)]
    assert shares == [[("a", True), ("c", True)], [("b", True), ("a", False)]]
    assert [p for s in shares for p, real in s if real] == ["a", "c", "b"]
    assert my_share(parts, 0, 1) == [(p, True) for p in parts]
    assert my_share([], 1, 2) == []
    assert [len(my_share(parts, r, 4)) for r in range(4)] == [1, 1, 1, 1], "a rank with none repeats one at weight 0"


def test_ranks_share_the_machines_cores_unless_told_a_thread_count():
    import os

    from speechrl.rlhf.core.seeding import thread_count

    assert thread_count(0) == (os.cpu_count() or 1)
    assert thread_count(0, share=2) == max(1, (os.cpu_count() or 1) // 2)
    assert thread_count(0, share=10**6) == 1
    assert thread_count(3, share=2) == 3


@pytest.fixture
def ray_cpus():
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False)
    yield
    ray.shutdown()


def _batch(worker, rng) -> TrainBatch:
    """Six GRPO-like rows on two clips, with their logprobs under `worker`'s current policy."""
    from speechrl.rlhf.model.logprobs import build_token_batch, prompt_ids_for, token_logprobs
    from speechrl.rlhf.model.prompts import render_prompt

    proc = worker.backbone.processor
    prompts, completions, audios = [], [], []
    for seconds in (1, 2):
        clip = rng.normal(0, 0.1, 16000 * seconds).astype(np.float32)
        ids = prompt_ids_for(proc, render_prompt(proc, "asr"), clip)
        for j in range(3):
            prompts.append(ids)
            completions.append(rng.integers(0, 300, 2 + 3 * j).tolist())
            audios.append(clip)
    batch = build_token_batch(proc, prompts, completions, audios, worker.backbone.tokenizer.pad_token_id)
    with torch.no_grad():
        logp = token_logprobs(worker.model, batch, 1.0, worker.allowed)
    sampled = [logp[i][batch.completion_mask[i]].tolist() for i in range(len(prompts))]
    return TrainBatch(prompts, completions, audios, 1.0, sampling_logprobs=sampled,
                      advantages=rng.normal(size=len(prompts)).tolist(), kl_coef=0.05)


def _assert_same_weights(a, b, atol=2e-6):
    """Weights after AdamW steps of lr 1e-3. Its first steps move each weight by about lr whatever the
    gradient's size, so float noise in a gradient near 0 can show up to a few percent of lr."""
    a, b = dict(a), dict(b)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


def test_two_ranks_take_one_ranks_step_and_checkpoints_move_between_rank_counts(sft_config, sft_assets, ray_cpus,
                                                                                tmp_path):
    from speechrl.rlhf.workers.policy_group import PolicyClient, make_policy_workers
    from speechrl.rlhf.workers.policy_worker import PolicyWorker

    # batch_size 2: three micro-batches of a 6-row minibatch, so rank 1 runs a weight-0 pass; token_mean:
    # each micro-batch is the one a single rank would run, so even per-micro-batch means agree
    # no MTP heads: several ranks skip them (model/mtp.py), and one rank's step is the comparison
    cfg = sft_config("ranks", "train.warmup_steps=0", "train.lr=1e-3", "train.batch_size=2", "train.torch_threads=1",
                     "model.mtp.num_heads=0")
    backbone, allowed = str(sft_assets[0]), list(range(300))
    one = PolicyWorker(cfg, backbone, allowed_ids=allowed, reference=True)
    rng = np.random.default_rng(0)
    first = _batch(one, rng)

    # one rank steps and saves; two ranks resume from its checkpoint
    one.train(first)
    one.save(str(tmp_path / "one-rank"))
    two = PolicyClient(make_policy_workers(cfg, backbone, str(tmp_path / "one-rank"), allowed_ids=allowed,
                                           reference=True, options=[{"num_cpus": 1}] * 2))
    assert len(set(two.node_ids())) == 1 and two.ping()
    _assert_same_weights(two.weights(), one.weights())

    second = _batch(one, rng)
    expected, got = one.train(second), two.train(second)
    assert got.keys() == expected.keys()
    for key in ("train/loss", "train/kl", "train/logprob_gap", "grad_norm", "lr"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    assert expected["grad_norm"] > 0 and expected["train/kl"] > 0, "the step moved the policy away from the reference"
    _assert_same_weights(two.weights(), one.weights())
    # what a sync sends: rank 0 puts the gathered weights in the object store, the driver gets the reference
    import ray

    from speechrl.rollouts.sync import StoredWeights

    stored = two.stored_weights()
    assert isinstance(stored, StoredWeights) and isinstance(stored.ref, ray.ObjectRef)
    _assert_same_weights(ray.get(stored.ref), one.weights())

    # two ranks save (rank 0 writes the one-rank files); one rank resumes and steps as the two do
    two.save(str(tmp_path / "two-ranks"))
    assert sorted(p.name for p in (tmp_path / "two-ranks").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one-rank").iterdir())
    resumed = PolicyWorker(cfg, backbone, str(tmp_path / "two-ranks"), allowed_ids=allowed, reference=True)
    third = _batch(one, rng)
    a, b = resumed.train(third), two.train(third)
    assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4, abs=1e-6)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    _assert_same_weights(two.weights(), resumed.weights())


def test_two_ranks_give_one_ranks_critic_values_and_ppo_step(sft_config, sft_assets, ray_cpus, tmp_path):
    """PPO's side: the value head sharded beside the policy, values() gathered in row order from both
    ranks, the value loss in the step, and the head in a two-rank checkpoint."""
    from speechrl.rlhf.workers.policy_group import PolicyClient, make_policy_workers
    from speechrl.rlhf.workers.policy_worker import VALUE_HEAD, PolicyWorker

    cfg = sft_config("ranks-ppo", "train.warmup_steps=0", "train.lr=1e-3", "train.batch_size=2",
                     "train.torch_threads=1", "model.mtp.num_heads=0")
    backbone, allowed = str(sft_assets[0]), list(range(300))
    one = PolicyWorker(cfg, backbone, allowed_ids=allowed, reference=True, critic=True)
    two = PolicyClient(make_policy_workers(cfg, backbone, allowed_ids=allowed, reference=True, critic=True,
                                           options=[{"num_cpus": 1}] * 2))
    batch = _batch(one, np.random.default_rng(1))
    expected, got = one.values(batch), two.values(batch)
    for key in ("values", "ref_logprobs"):
        assert len(got[key]) == len(batch)
        for a, b in zip(got[key], expected[key]):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=key)
    batch.old_values = expected["values"]
    batch.returns = [[v + 0.5 for v in row] for row in expected["values"]]
    a, b = one.train(batch), two.train(batch)
    for key in ("train/loss", "train/value_loss", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert a["train/value_loss"] > 0
    _assert_same_weights(two.weights(), one.weights(), atol=5e-5)
    two.save(str(tmp_path / "ppo"))
    head = torch.load(tmp_path / "ppo" / VALUE_HEAD, weights_only=True)
    for name, value in one.value_head.state_dict().items():
        torch.testing.assert_close(head[name], value, atol=2e-6, rtol=1e-4, msg=name)


def test_two_ranks_train_a_lora_adapter_as_one_rank_does(sft_config, sft_assets, ray_cpus, tmp_path):
    """LoRA on sharded layers: the frozen base and the adapter share FSDP units; the engines get the
    adapter alone, gathered, and the checkpoint resumes on one rank."""
    from speechrl.rlhf.workers.policy_group import PolicyClient, make_policy_workers
    from speechrl.rlhf.workers.policy_worker import PolicyWorker

    cfg = sft_config("ranks-lora", "train.warmup_steps=0", "train.lr=1e-3", "train.batch_size=2",
                     "train.torch_threads=1", "model.lora.enabled=true")
    backbone, allowed = str(sft_assets[0]), list(range(300))
    one = PolicyWorker(cfg, backbone, allowed_ids=allowed, reference=True)
    two = PolicyClient(make_policy_workers(cfg, backbone, allowed_ids=allowed, reference=True,
                                           options=[{"num_cpus": 1}] * 2))
    batch = _batch(one, np.random.default_rng(2))
    a, b = one.train(batch), two.train(batch)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4) and a["grad_norm"] > 0
    expected, got = one.weights(), two.weights()
    assert got.config == expected.config
    _assert_same_weights(got.tensors, expected.tensors)
    two.save(str(tmp_path / "lora"))
    resumed = PolicyWorker(cfg, backbone, str(tmp_path / "lora"), allowed_ids=allowed)
    _assert_same_weights(resumed.weights().tensors, got.tensors, atol=0)
