"""k1/k2/k3 KL estimators on hand values."""
import math

import pytest
import torch

from speechrl.rlhf.algos import KL_ESTIMATORS
from speechrl.rlhf.algos.kl import kl_k1, kl_k2, kl_k3

LN2 = math.log(2)


@pytest.mark.parametrize(
    ("logp", "ref", "k1", "k2", "k3"),
    [
        # pi = 1, ref = 0.5: log r = -ln2; k3 = 0.5 - 1 + ln2 = 0.1931
        (0.0, -LN2, LN2, 0.5 * LN2**2, 0.5 - 1 + LN2),
        # pi = 0.5, ref = 1: log r = ln2; k1 negative, k3 = 2 - 1 - ln2 = 0.3069
        (-LN2, 0.0, -LN2, 0.5 * LN2**2, 1 - LN2),
    ],
)
def test_hand_values(logp, ref, k1, k2, k3):
    logp, ref = torch.tensor([logp]), torch.tensor([ref])
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([k1]))
    torch.testing.assert_close(kl_k2(logp, ref), torch.tensor([k2]))
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([k3]))


def test_all_zero_when_policies_agree_and_k3_never_negative():
    g = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(4, 16, generator=g) * 10, -torch.rand(4, 16, generator=g) * 10
    for name in ("k1", "k2", "k3"):
        torch.testing.assert_close(KL_ESTIMATORS.get(name)(logp, logp), torch.zeros(4, 16))
    assert (kl_k3(logp, ref) >= 0).all() and (kl_k2(logp, ref) >= 0).all()


def test_k3_is_finite_for_extreme_log_ratios():
    logp = torch.tensor([0.0, -1000.0], requires_grad=True)
    ref = torch.tensor([-1000.0, 0.0])
    out = kl_k3(logp, ref)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], torch.tensor(math.exp(-20) - 1 + 20))
    out.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_gradient_flows_to_logprobs():
    logp = torch.tensor([[0.0, -LN2]], requires_grad=True)
    kl_k3(logp, torch.tensor([[-LN2, 0.0]])).sum().backward()
    # d/dlogp (r - 1 - log r) with log r = ref - logp is 1 - r: [1 - 0.5, 1 - 2]
    torch.testing.assert_close(logp.grad, torch.tensor([[0.5, -1.0]]))
