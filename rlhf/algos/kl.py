"""Per-token estimators of KL(pi || ref) from samples of pi (Schulman, "Approximating KL", 2020).

With log r = ref_logprobs - logprobs on tokens sampled from pi:
k1 = -log r (unbiased, high variance, can be negative); k2 = (log r)^2 / 2 (biased, low
variance, >= 0); k3 = r - 1 - log r (unbiased and >= 0; GRPO's choice).
"""
from __future__ import annotations

import torch
from torch import Tensor

from speechrl.rlhf.algos.registry import KL_ESTIMATORS

# exp(20) ~ 5e8: beyond that k3 is dominated by one token and overflows in bf16/fp16.
MAX_LOG_RATIO = 20.0


@KL_ESTIMATORS.register("k1")
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2")
def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return 0.5 * (ref_logprobs - logprobs) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    # Clamping log r to [-20, 20] keeps exp finite; it only changes tokens whose
    # probabilities differ by a factor above 5e8, where the value is meaningless anyway.
    log_r = (ref_logprobs - logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(log_r) - 1.0 - log_r
