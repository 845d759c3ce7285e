"""Loss aggregations on a hand-made mask."""
import pytest
import torch

from speechrl.rlhf.algos import LOSS_AGGREGATIONS

LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, float("nan"), 7.0], [5.0, 5.0, 5.0, 5.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])  # 3 tokens, 2 tokens, empty row

EXPECTED = {
    "token_mean": (1 + 2 + 3 + 10 + 20) / 5,  # 7.2
    "seq_mean_token_mean": (2.0 + 15.0) / 2,  # row means 2 and 15; the empty row is skipped
    "seq_mean_token_sum": (6.0 + 30.0) / 2,
    "seq_mean_token_sum_norm": (6.0 + 30.0) / (3 * 4),  # constant B * T
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hand_values_ignore_padding_even_nan(name):
    out = LOSS_AGGREGATIONS.get(name)(LOSS, MASK)
    assert out.dim() == 0
    assert out.item() == pytest.approx(EXPECTED[name])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_empty_mask_gives_connected_zero(name):
    per_token = torch.full((2, 3), float("nan"), requires_grad=True)
    out = LOSS_AGGREGATIONS.get(name)(per_token, torch.zeros(2, 3, dtype=torch.bool))
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    torch.testing.assert_close(per_token.grad, torch.zeros(2, 3))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_gradient_reaches_only_masked_tokens(name):
    per_token = LOSS.clone().requires_grad_()
    LOSS_AGGREGATIONS.get(name)(per_token, MASK.bool()).backward()
    assert torch.isfinite(per_token.grad).all()
    assert (per_token.grad[MASK == 0] == 0).all() and (per_token.grad[MASK == 1] > 0).all()


def test_token_mean_gradient_is_one_over_token_count():
    per_token = LOSS.clone().requires_grad_()
    LOSS_AGGREGATIONS.get("token_mean")(per_token, MASK).backward()
    torch.testing.assert_close(per_token.grad, MASK.float() / 5)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="per_token and mask"):
        LOSS_AGGREGATIONS.get("token_mean")(LOSS, MASK[:, :2])
