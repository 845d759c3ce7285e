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


def micro_batches(prompt_ids: list[list[int]], completion_ids: list[list[int]], rows: list[int], max_rows: int,
                  max_tokens: int = 0) -> list[list[int]]:
    """`rows` (sample indices of one minibatch) cut into micro-batches of at most `max_rows` rows and,
    with `max_tokens` > 0, at most that many tokens in the forward pass (`forward_tokens`).

    Without a token budget rows keep their order. With one, they are bucketed first: sorted by prompt
    length and completion length, rows sharing a prompt kept together (it then runs once), so a
    micro-batch holds rows of similar length and pads little. A row over the budget alone is a
    micro-batch of its own (it has to run); every row is in exactly one micro-batch.
    """
    if max_tokens <= 0:
        return [rows[i:i + max_rows] for i in range(0, len(rows), max_rows)]
    first_seen: dict[tuple, int] = {}
    for i in rows:
        first_seen.setdefault(tuple(prompt_ids[i]), len(first_seen))
    order = sorted(rows, key=lambda i: (len(prompt_ids[i]), first_seen[tuple(prompt_ids[i])], len(completion_ids[i])))
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < max_rows and \
                forward_tokens(prompt_ids, completion_ids, out[-1] + [i]) <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def forward_tokens(prompt_ids: list[list[int]], completion_ids: list[list[int]], rows: list[int]) -> int:
    """Positions a micro-batch's forward holds: each distinct prompt once (rows sharing one run it
    once: model/logprobs.py), plus every row's completion padded to the longest; the activations
    and the [rows, positions, vocab] logits grow with it."""
    prompts = {tuple(prompt_ids[i]) for i in rows}
    return len(prompts) * max(len(p) for p in prompts) + len(rows) * max(len(completion_ids[i]) for i in rows)

