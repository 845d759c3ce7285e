import logging
import math

import numpy as np
import pytest

from speechrl.rewards.combine import RewardOutputError, combine, score_batch


def length(completions, **kwargs):
    return [float(len(c)) for c in completions]


def fails_on_bad(completions, **kwargs):
    if "bad" in completions:
        raise ValueError("cannot score 'bad'")
    return [1.0] * len(completions)


def nan_on_empty(completions, **kwargs):
    return {"reward": [math.nan if not c else 1.0 for c in completions], "seen": [1.0] * len(completions)}


def test_combine_z_normalizes_over_valid_samples():
    # a: [1, 2, 3, nan] -> valid mean 2, std sqrt(2/3) -> z = [-1.2247, 0, 1.2247]
    # b: [10, 10, 10, 0] is constant over the valid samples -> contributes 0
    # c: [1, 0, 1, 5], not normalized, weight 0.5 -> raw 0.5 * c
    a = np.array([1.0, 2.0, 3.0, math.nan])
    b = np.array([10.0, 10.0, 10.0, 0.0])
    c = np.array([1.0, 0.0, 1.0, 5.0])
    total, valid = combine({"a": a, "b": b, "c": c}, {"a": 2.0, "b": 1.0, "c": 0.5}, {"a": True, "b": True, "c": False})
    z = math.sqrt(1.5)
    assert valid.tolist() == [True, True, True, False]
    np.testing.assert_allclose(total[:3], [-2 * z + 0.5, 0.0, 2 * z + 0.5])
    assert math.isnan(total[3])


def test_a_logged_only_reward_that_cannot_score_a_sample_keeps_it_in_training(caplog):
    """Weight 0 = logged, not trained on: its NaN neither drops the sample nor reaches the total; where
    every weight is 0, the components decide as before."""
    a, logged = np.array([1.0, 2.0, 3.0]), np.array([0.5, math.nan, 0.5])
    total, valid = combine({"a": a, "check": logged}, {"a": 1.0, "check": 0.0}, {"a": False, "check": False})
    assert valid.tolist() == [True, True, True] and total.tolist() == [1.0, 2.0, 3.0]
    total, valid = combine({"a": np.array([1.0, math.nan, 3.0]), "check": logged}, {"a": 1.0, "check": 0.0},
                           {"a": False, "check": False})
    assert valid.tolist() == [True, False, True] and math.isnan(total[1])
    _, valid = combine({"check": logged}, {"check": 0.0}, {"check": False})
    assert valid.tolist() == [True, False, True]
    with caplog.at_level(logging.INFO):
        result = score_batch({"length": length, "n": nan_on_empty}, {"completions": ["a", "", "b"]},
                             weights={"length": 1.0, "n": 0.0})
    assert result.valid.tolist() == [True, True, True] and result.errors == {}
    assert result.total.tolist() == [1.0, 0.0, 1.0] and math.isnan(result.rewards["n"][1])
    assert "lack a logged-only (weight 0) reward" in caplog.text and "n returned nan" in caplog.text


def test_combine_requires_a_weight_for_every_component():
    with pytest.raises(ValueError, match=r"\['b'\]"):
        combine({"a": np.ones(2), "b": np.ones(2)}, {"a": 1.0}, {"a": True, "b": True})


def test_score_batch_isolates_a_raising_sample(caplog):
    batch = {"completions": ["ok", "bad", "fine"], "id": ["u1", "u2", "u3"], "mode": "asr"}
    with caplog.at_level(logging.WARNING):
        result = score_batch({"length": length, "flaky": fails_on_bad}, batch)
    assert result.valid.tolist() == [True, False, True]
    assert result.total[0] == 3.0 and math.isnan(result.total[1]) and result.total[2] == 5.0
    assert "flaky raised ValueError: cannot score 'bad'" in result.errors[1]
    assert list(result.errors) == [1]
    assert "id 'u2'" in caplog.text
    np.testing.assert_array_equal(result.rewards["length"], [2.0, 3.0, 4.0])


def test_score_batch_nan_marks_only_that_sample():
    result = score_batch({"n": nan_on_empty}, {"completions": ["a", "", "b"]})
    assert result.valid.tolist() == [True, False, True]
    assert result.errors == {1: "n returned nan"}
    assert set(result.components) == {"n/reward", "n/seen"}
    metrics = result.metrics()
    assert metrics["rewards/unscored"] == 1
    assert metrics["rewards/n/reward"] == 1.0 and metrics["rewards/total"] == 1.0


def test_score_batch_metrics_are_means_over_valid_samples():
    result = score_batch({"length": length, "flaky": fails_on_bad}, {"completions": ["a", "bad", "abc"]})
    metrics = result.metrics()
    assert metrics["rewards/length/reward"] == 2.0  # (1 + 3) / 2; the 3 of "bad" is left out
    assert metrics["rewards/unscored"] == 1


def test_wrong_length_output_fails_naming_the_reward():
    with pytest.raises(RewardOutputError, match="reward 'short'.*shape \\(1,\\) for a batch of 2"):
        score_batch({"short": lambda completions, **kw: [1.0]}, {"completions": ["a", "b"]})


def test_reward_failing_everywhere_is_an_error():
    def broken(completions, **kwargs):
        raise KeyError("text")

    with pytest.raises(RuntimeError, match="reward 'broken' failed on every sample"):
        score_batch({"broken": broken}, {"completions": ["a", "b"]})


def test_mismatched_columns_are_rejected():
    with pytest.raises(ValueError, match="'text': 1"):
        score_batch({"length": length}, {"completions": ["a", "b"], "text": ["a"]})


def test_asr_reward_in_score_batch():
    from speechrl.rewards.asr import AsrWerReward

    batch = {"completions": ["turn right", "go 10 meters"], "text": ["turn left", "go ten meters"],
             "completion_ids": [[1, 2], [3, 4, 5]], "mode": "asr"}
    result = score_batch({"asr_wer": AsrWerReward()}, batch)
    np.testing.assert_array_equal(result.total, [-0.5, 0.0])
    assert "asr_wer/runaway" in result.components and result.valid.all()
