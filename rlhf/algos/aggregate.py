"""Ways to reduce a per-token loss [B, T] under a mask to the scalar that is backpropagated.

The rule sets each token's weight: "token_mean" all alike (DAPO), "seq_mean_token_mean" each sequence
alike (original GRPO), "seq_mean_token_sum" by length, "seq_mean_token_sum_norm" by a constant
(Dr. GRPO). An empty mask gives 0 still on the graph, so an all-padding step cannot give NaN.
"""
from __future__ import annotations

import torch
from torch import Tensor

from speechrl.rlhf.algos.registry import LOSS_AGGREGATIONS


def _masked(per_token: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    # where, not multiply: NaN/inf on padding times 0 would still be NaN.
    if per_token.shape != mask.shape or per_token.dim() != 2:
        raise ValueError(f"per_token and mask must be [B, T] of one shape; got {tuple(per_token.shape)}, {tuple(mask.shape)}")
    mask = mask.bool()
    return torch.where(mask, per_token, torch.zeros_like(per_token)), mask


@LOSS_AGGREGATIONS.register("token_mean")
def token_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    values, mask = _masked(per_token, mask)
    return values.sum() / mask.sum().clamp(min=1)


def _seq_mean(per_seq: Tensor, mask: Tensor) -> Tensor:
    # Mean over sequences with at least one token; an empty one (failed rollout) is not a zero loss.
    has_tokens = mask.any(dim=-1)
    per_seq = torch.where(has_tokens, per_seq, torch.zeros_like(per_seq))
    return per_seq.sum() / has_tokens.sum().clamp(min=1)


@LOSS_AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    values, mask = _masked(per_token, mask)
    return _seq_mean(values.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1), mask)


@LOSS_AGGREGATIONS.register("seq_mean_token_sum")
def seq_mean_token_sum(per_token: Tensor, mask: Tensor) -> Tensor:
    values, mask = _masked(per_token, mask)
    return _seq_mean(values.sum(dim=-1), mask)


@LOSS_AGGREGATIONS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(per_token: Tensor, mask: Tensor) -> Tensor:
    # Dr. GRPO's constant normalizer is the generation budget; here it is the width T, so pad
    # batches to max_new_tokens for it to be constant across steps. Divides by all B sequences.
    values, _ = _masked(per_token, mask)
    return values.sum() / max(per_token.numel(), 1)
