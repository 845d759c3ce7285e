"""`TrainBatch`: the one type between the driver and the policy worker.

What the worker does with a batch follows from what it holds, never from an algorithm's name:
preference pairs (`rejected_ids`) take the preference loss; otherwise the clipped policy loss on
`advantages` (one per sample, or one per completion token), with the KL to the reference when
`kl_coef` > 0 and the critic's value loss when `returns` are given."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class TrainBatch:
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # sampled completions (preference pairs: the chosen ones)
    audios: list[Optional[np.ndarray]]  # each prompt's clip (None: a text-only prompt)
    temperature: float = 1.0  # the sampling temperature the logprobs are taken at
    sampling_logprobs: Optional[list[list[float]]] = None  # the engines' logprob of each completion token
    advantages: Optional[list] = None  # a float per sample, or a list per sample (a value per completion token)
    returns: Optional[list[list[float]]] = None  # the critic's regression targets, per completion token
    old_values: Optional[list[list[float]]] = None  # the critic's values at rollout time, per completion token
    rejected_ids: Optional[list[list[int]]] = None  # preference pairs: the rejected completions
    kl_coef: float = 0.0  # weight of the per-token KL to the reference in the loss; 0 = no KL term
    pairs: Optional[list[tuple[int, int]]] = None  # preference rows: the (chosen, rejected) samples they came from

    def __post_init__(self):
        n = len(self.prompt_ids)
        for name in ("completion_ids", "audios", "sampling_logprobs", "advantages", "returns", "old_values",
                     "rejected_ids"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"TrainBatch: {name} has {len(value)} rows, prompt_ids {n}")
        if (self.returns is None) != (self.old_values is None):
            raise ValueError("TrainBatch: returns and old_values come together (the critic's targets)")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def is_preference(self) -> bool:
        return self.rejected_ids is not None

    @property
    def needs_critic(self) -> bool:
        return self.returns is not None

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0 or self.is_preference


def sample_batch(samples, requests, keep: list[int], temperature: float, **fields) -> TrainBatch:
    """The samples `keep` (their prompts, completions, logprobs and clips) as a TrainBatch."""
    return TrainBatch([samples[i].prompt_ids for i in keep], [samples[i].completion_ids for i in keep],
                      [requests[samples[i].prompt_index].audio for i in keep], temperature,
                      sampling_logprobs=[samples[i].logprobs for i in keep], **fields)
