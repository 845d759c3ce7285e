"""The online updates (GRPO, PPO, online DPO) as peers: each turns a step's scored samples into the
one TrainBatch the policy worker trains on. Samples and scores are built by hand here; the real
engines, rewards and worker run them in tests/e2e."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from speechrl.rlhf.algos import ADVANTAGES, UPDATES
from speechrl.rlhf.algos.batch import TrainBatch
from speechrl.rlhf.algos.gae import gae_advantages
from speechrl.rlhf.algos.grpo_advantage import grpo_advantages
from speechrl.rlhf.algos.updates import KL_STATE
from speechrl.rlhf.core.config import load_recipe


def sample(prompt: int, completion: list[int]):
    return SimpleNamespace(prompt_index=prompt, prompt_ids=[1, 2], completion_ids=completion,
                           logprobs=[-1.0] * len(completion))


def scored(total, valid=None):
    return SimpleNamespace(total=np.asarray(total, dtype=float),
                           valid=np.asarray(valid if valid is not None else [True] * len(total)))


REQUESTS = [SimpleNamespace(audio=None), SimpleNamespace(audio=np.zeros(3, np.float32))]


class RecordingPolicy:
    """What PPO asks of the policy worker before the update: zero values, the sampling logprobs
    as the reference's (so the KL is 0 and the returns are the scores)."""

    def values(self, batch: TrainBatch) -> dict:
        self.batch = batch
        return {"values": [[0.0] * len(c) for c in batch.completion_ids], "ref_logprobs": batch.sampling_logprobs}


def test_every_online_algorithm_is_an_update_and_gae_an_estimator():
    assert UPDATES.names() == ["grpo", "online_dpo", "ppo"]
    assert ADVANTAGES.names() == ["gae", "grpo"]


def test_grpo_update_gives_group_advantages_and_drops_empty_completions():
    cfg = load_recipe("asr/grpo", ["rl.kl_coef=0.05"])
    samples = [sample(0, [5]), sample(0, [6, 7]), sample(1, []), sample(1, [8])]
    batch, metrics = UPDATES.get("grpo")(cfg).prepare(samples, scored([1.0, 0.0, 2.0, 0.0]), REQUESTS, None)
    expected = grpo_advantages(torch.tensor([1.0, 0.0, 2.0, 0.0]), torch.tensor([0, 0, 1, 1]), torch.ones(4, dtype=bool))
    assert batch.completion_ids == [[5], [6, 7], [8]]  # the empty completion has nothing to train
    assert batch.advantages == pytest.approx(expected[[0, 1, 3]].tolist())
    assert batch.audios[2] is REQUESTS[1].audio and batch.kl_coef == 0.05
    assert not batch.needs_critic and batch.needs_reference and not batch.is_preference
    assert metrics == {"grpo/zero_variance_groups": 0.0}


def test_grpo_dynamic_sampling_drops_groups_that_teach_nothing():
    samples = [sample(0, [5]), sample(0, [6]), sample(1, [7]), sample(1, [8]), sample(2, [9]), sample(2, [4])]
    # group 0 all equal; group 2 has one scored sample (nothing to compare with); group 1 differs
    requests = [*REQUESTS, SimpleNamespace(audio=None)]
    scores = scored([0.5, 0.5, 1.0, 0.0, 3.0, float("nan")], [True, True, True, True, True, False])
    kept, metrics = UPDATES.get("grpo")(load_recipe("asr/grpo")).prepare(samples, scores, requests, None)
    assert metrics["grpo/zero_variance_groups"] == pytest.approx(2 / 3)
    assert kept.completion_ids == [[5], [6], [7], [8], [9], [4]]  # "off" (the default) trains on them, at 0
    assert kept.advantages[:2] == [0.0, 0.0] and kept.advantages[4:] == [0.0, 0.0]
    dropped, metrics = UPDATES.get("grpo")(load_recipe("asr/grpo", ["grpo.dynamic_sampling=drop"])).prepare(
        samples, scores, requests, None)
    assert dropped.completion_ids == [[7], [8]] and dropped.advantages == kept.advantages[2:4]
    assert metrics["grpo/zero_variance_groups"] == pytest.approx(2 / 3)
    nothing, metrics = UPDATES.get("grpo")(load_recipe("asr/grpo", ["grpo.dynamic_sampling=drop"])).prepare(
        samples[:2], scored([0.5, 0.5]), requests, None)
    assert nothing is None and metrics["grpo/zero_variance_groups"] == 1.0


def test_grpo_overlong_punishment_is_soft_over_the_buffer():
    from speechrl.rlhf.algos.updates import overlong_penalty

    assert overlong_penalty([10, 12, 14, 16], 16, 4, 0.5).tolist() == [0.0, 0.0, 0.25, 0.5]
    cfg = load_recipe("asr/grpo", ["rollout.sampling.max_new_tokens=4", "grpo.overlong_buffer=2"])
    samples = [sample(0, [1]), sample(0, [1, 2, 3, 4])]  # equal scores: only the length tells them apart
    batch, metrics = UPDATES.get("grpo")(cfg).prepare(samples, scored([1.0, 1.0]), REQUESTS, None)
    assert metrics["grpo/overlong_penalty"] == pytest.approx(0.5) and metrics["grpo/zero_variance_groups"] == 0
    assert batch.advantages[0] > 0 > batch.advantages[1]


@pytest.mark.parametrize("override, message", [
    ("grpo.dynamic_sampling=refill", "`grpo.dynamic_sampling` is 'refill'; choose one of off, drop"),
    ("grpo.overlong_buffer=500", "`grpo.overlong_buffer`=500 is longer than `rollout.sampling.max_new_tokens`"),
    ("grpo.overlong_buffer=-1", "grpo.overlong_buffer"),
    ("grpo.overlong_penalty=0", "grpo.overlong_penalty"),
])
def test_grpo_knobs_are_checked_at_load(override, message):
    from speechrl.rlhf.core.config import RecipeError

    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe("asr/grpo", [override])


def test_ppo_update_returns_gae_targets_and_saves_its_kl_coefficient(tmp_path):
    cfg = load_recipe("realtime/ppo", ["ppo.whiten_advantages=false", "ppo.gamma=1.0", "ppo.lam=1.0"])
    update = UPDATES.get("ppo")(cfg)
    samples = [sample(0, [5, 6]), sample(0, [7]), sample(1, [8])]
    policy = RecordingPolicy()
    batch, metrics = update.prepare(samples, scored([1.0, 2.0, float("nan")], [True, True, False]), REQUESTS, policy)
    assert len(policy.batch) == 2  # the unscored sample is left out before the critic is asked
    assert batch.returns == [[1.0, 1.0], [2.0]]  # KL 0, values 0, lam 1: the score on every token
    assert batch.advantages == [[1.0, 1.0], [2.0]] and batch.old_values == [[0.0, 0.0], [0.0]]
    assert batch.needs_critic and batch.kl_coef == 0.0  # the KL is in the reward, not in the loss
    assert metrics["ppo/samples"] == 2 and metrics["ppo/reply_kl"] == 0.0
    update.kl.kl_coef = 0.123
    update.save(tmp_path)
    assert (tmp_path / KL_STATE).is_file()
    assert UPDATES.get("ppo")(cfg, tmp_path).kl.kl_coef == pytest.approx(0.123)


def test_gae_estimator_is_gae_advantages():
    rewards, values = torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.tensor([[0.5, 0.2], [0.1, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    from speechrl.rlhf.algos.estimators import AdvantageInputs

    inputs = AdvantageInputs(torch.zeros(2), torch.arange(2), torch.ones(2, dtype=bool), rewards, values, mask)
    got = ADVANTAGES.get("gae")(inputs, SimpleNamespace(gamma=0.9, lam=0.8, whiten_advantages=False))
    want = gae_advantages(rewards, values, mask, 0.9, 0.8)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_online_dpo_update_pairs_best_with_worst_and_skips_ties():
    cfg = load_recipe("tts/online_dpo")
    update = UPDATES.get("online_dpo")(cfg)
    samples = [sample(0, [5]), sample(0, [6]), sample(1, [7]), sample(1, [8])]
    batch, metrics = update.prepare(samples, scored([0.2, 0.9, 0.5, 0.5]), REQUESTS, None)
    assert batch.pairs == [(1, 0)] and batch.completion_ids == [[6]] and batch.rejected_ids == [[5]]
    assert batch.is_preference and batch.needs_reference and metrics == {"train/pairs": 1}
    assert update.prepare(samples, scored([0.5] * 4), REQUESTS, None) == (None, {"train/pairs": 0})


def test_train_batch_rejects_ragged_columns():
    with pytest.raises(ValueError, match="advantages has 1 rows, prompt_ids 2"):
        TrainBatch([[1], [2]], [[3], [4]], [None, None], advantages=[0.5])
    with pytest.raises(ValueError, match="returns and old_values"):
        TrainBatch([[1]], [[3]], [None], returns=[[1.0]])
