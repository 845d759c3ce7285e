import numpy as np
import pytest

from speechrl.rewards.worker import RewardWorker, make_reward_actor
from speechrl.rlhf.core.config import RewardSpec

BATCH = {
    "completions": ["turn right", "go 10 meters", "go go go go"],
    "completion_ids": [[1, 2], [3, 4, 5], [6, 6, 6, 6]],
    "text": ["turn left", "go ten meters", "go"],
    "id": ["a", "b", "c"],
    "mode": "asr",
}
# WER rewards [-0.5, 0, -1.5] -> mean -2/3, population std 0.6236 -> z = [0.267, 1.069, -1.336]
EXPECTED_Z = (np.array([-0.5, 0.0, -1.5]) + 2 / 3) / np.std([-0.5, 0.0, -1.5])


def test_worker_in_process_accepts_dicts_and_specs():
    worker = RewardWorker([{"name": "asr_wer", "weight": 2.0, "normalize": True}])
    np.testing.assert_allclose(worker.score(BATCH).total, 2.0 * EXPECTED_Z)
    raw = RewardWorker([RewardSpec(name="asr_wer", normalize=False, kwargs={"repetition_penalty": 0.0})])
    np.testing.assert_allclose(raw.score(BATCH).total, [-0.5, 0.0, -1.0])


def test_worker_rejects_bad_specs():
    with pytest.raises(ValueError, match="unknown keys \\['wieght'\\]"):
        RewardWorker([{"name": "asr_wer", "wieght": 2.0}])
    with pytest.raises(ValueError, match="more than once"):
        RewardWorker([{"name": "asr_wer"}, {"name": "asr_wer"}])


@pytest.mark.ray
def test_worker_as_ray_actor(ray_cluster):
    actor = make_reward_actor([RewardSpec(name="asr_wer", weight=1.0, normalize=True)])
    result = ray_cluster.get(actor.score.remote(BATCH), timeout=60)
    np.testing.assert_allclose(result.total, EXPECTED_Z)
    assert result.valid.all() and result.metrics()["rewards/asr_wer/repetition"] == 1 / 3


def test_replica_slices_join_in_order_with_reasons_shifted():
    from speechrl.rewards.combine import RawScores
    from speechrl.rewards.worker import _concat

    first = RawScores({"r": {"reward": np.array([1.0, np.nan]), "extra": np.array([5.0, 6.0])}}, {1: ["r: no ref"]})
    second = RawScores({"r": {"reward": np.array([np.nan, 4.0, 5.0])}}, {0: ["r raised"]})
    joined = _concat([(0, first), (2, second)])
    np.testing.assert_array_equal(joined.components["r"]["reward"], [1.0, np.nan, np.nan, 4.0, 5.0])
    np.testing.assert_array_equal(joined.components["r"]["extra"], [5.0, 6.0, np.nan, np.nan, np.nan])
    assert joined.reasons == {1: ["r: no ref"], 2: ["r raised"]}


@pytest.mark.ray
def test_a_reward_actor_computes_on_the_threads_it_is_given(ray_cluster):
    """A run's reward actor computes on `train.torch_threads` (0 = every core: scoring is a phase of
    its own), not on what Ray's start left it."""
    from speechrl.rlhf.core.seeding import thread_count

    def threads(actor):
        try:
            return ray_cluster.get(actor.__ray_call__.remote(lambda self: __import__("torch").get_num_threads()),
                                   timeout=60)
        finally:
            ray_cluster.kill(actor)

    # without `threads` an actor keeps what its process got: 1 alone here, 2 in a full CI run (Ray sets
    # OMP_NUM_THREADS=1 in a worker only if the variable is unset, and torch reads it once)
    spec = [RewardSpec(name="asr_wer")]
    assert threads(make_reward_actor(spec, threads=0)) == thread_count(0)
    assert threads(make_reward_actor(spec, threads=1)) == 1
