"""PPO's critic: a value head on a decoder's hidden states, read at the completion positions.

Values share `logprobs.token_logprobs`'s grid (position t is the state after input token t), so V[t]
lines up with the next token's logprob, `completion_mask` and kl_reward.py's per-token rewards.
Kept out of rlhf/algos (pure tensor functions) because the head is a module with parameters.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from speechrl.rlhf.model.logprobs import TokenBatch, _inputs_embeds, audio_model


class ValueHead(nn.Module):
    """hidden [..., H] -> value [...], in float32.

    Zero-initialized: an untrained critic predicts 0 everywhere, so the first advantages are the
    plain discounted returns rather than the noise of a random projection. Float32 because values
    are regressed to returns whose scale bf16's 8 bits of mantissa would blur.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


def completion_values(value_head: ValueHead, hidden: Tensor, completion_mask: Tensor) -> Tensor:
    """Values [B, L-1] from last hidden states [B, L, H], 0 where `completion_mask` is False.

    The last input position is dropped: the state after the final token starts no action (the
    episode has ended), exactly as its logits predict no token `token_logprobs` keeps.
    """
    if hidden.dim() != 3 or completion_mask.shape != (hidden.shape[0], hidden.shape[1] - 1):
        raise ValueError(f"hidden must be [B, L, H] and completion_mask [B, L-1]; got {tuple(hidden.shape)}, "
                         f"{tuple(completion_mask.shape)}")
    values = value_head(hidden[:, :-1])
    return torch.where(completion_mask.bool(), values, torch.zeros_like(values))


def token_values(model, value_head: ValueHead, batch: TokenBatch) -> Tensor:
    """Values [B, L-1] of a critic backbone on a token batch, aligned with `token_logprobs`.

    Runs the base model (audio tower, projector, decoder) without its LM head: a critic needs the
    hidden states, not [B, L, vocab] logits. Rows sharing a clip (`audio_index`) encode it once.
    """
    index = batch.audio_index if batch.audio_index is not None else torch.arange(len(batch.input_ids),
                                                                                 device=batch.input_ids.device)
    embeds = _inputs_embeds(model, batch.input_ids, batch.input_features, batch.feature_attention_mask, index)
    hidden = audio_model(model)(inputs_embeds=embeds, attention_mask=batch.attention_mask).last_hidden_state
    return completion_values(value_head, hidden, batch.completion_mask)
