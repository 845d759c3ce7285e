"""The algorithm registries are filled by importing the package and reject duplicates."""
import pytest

from speechrl.rlhf.algos import ADVANTAGES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES


def test_import_fills_every_registry():
    assert ADVANTAGES.names() == ["gae", "grpo"]
    assert POLICY_LOSSES.names() == ["clipped"]
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]
    assert LOSS_AGGREGATIONS.names() == [
        "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm", "token_mean",
    ]


def test_duplicate_name_is_rejected_and_original_kept():
    original = KL_ESTIMATORS.get("k3")
    with pytest.raises(ValueError, match="KL estimator 'k3' is already registered"):
        KL_ESTIMATORS.register("k3")(lambda logprobs, ref_logprobs: logprobs)
    assert KL_ESTIMATORS.get("k3") is original


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(KeyError, match="registered: gae, grpo"):
        ADVANTAGES.get("rloo")
