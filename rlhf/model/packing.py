"""Rows that share a prompt packed into one sequence: the prompt once, then every row's completion.

Each completion token attends to the prompt and to its own row's earlier tokens (a block mask), and
its positions continue from the prompt's end as in its own row, so the decoder computes exactly what
it computes for the rows one by one, with the prompt's work done once per group. One forward pass and
no KV cache: this is the shared-prompt path where the cache path (logprobs.py) cannot run, under
gradient checkpointing (no cache in training) and on sharded layers (model/sharding.py). transformers
takes a prepared 4D mask as given; building it is what a library would do for us, and none of ours
packs shared prefixes for training (TRL and verl pack distinct sequences, which need no such mask).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedGroups:
    input_ids: torch.Tensor  # [G, L] group g's prompt, then its rows' completions, right-padded
    position_ids: torch.Tensor  # [G, L]
    allowed: torch.Tensor  # [G, L, L] bool: query position may attend to key position
    predictor: torch.Tensor  # [B, S] position in row b's group whose output predicts its completion token s


def pack_groups(input_ids: torch.Tensor, group: torch.Tensor, prompt_len: torch.Tensor, comp_len: torch.Tensor,
                first_row: torch.Tensor, pad_id: int = 0) -> PackedGroups:
    """`input_ids` [B, W]: rows of prompt + completion; `group[b]`: row b's prompt group (0..G-1, whose
    first row is `first_row[g]`); `prompt_len`, `comp_len` [B]. Rows of a group share their prompt ids."""
    rows, groups = len(input_ids), len(first_row)
    device = input_ids.device
    start = torch.zeros(rows, dtype=torch.long)  # where row b's completion starts in its group's sequence
    end = prompt_len[first_row].cpu().clone()
    for b in range(rows):
        g = int(group[b])
        start[b] = end[g]
        end[g] += int(comp_len[b])
    width = int(end.max())
    ids = torch.full((groups, width), pad_id, dtype=torch.long)
    positions = torch.zeros((groups, width), dtype=torch.long)
    owner = torch.full((groups, width), -2, dtype=torch.long)  # -1: the prompt, b: row b's completion, -2: padding
    for g in range(groups):
        p = int(prompt_len[first_row[g]])
        ids[g, :p] = input_ids[first_row[g], :p].cpu()
        positions[g, :p] = torch.arange(p)
        owner[g, :p] = -1
    for b in range(rows):
        g, p, c, s = int(group[b]), int(prompt_len[b]), int(comp_len[b]), int(start[b])
        ids[g, s:s + c] = input_ids[b, p:p + c].cpu()
        positions[g, s:s + c] = p + torch.arange(c)
        owner[g, s:s + c] = b
    index = torch.arange(width)
    causal = index[None, :] <= index[:, None]  # [query, key]
    keys, queries = owner[:, None, :], owner[:, :, None]
    allowed = causal[None] & ((keys == -1) | (keys == queries)) & (keys != -2)
    allowed |= torch.eye(width, dtype=torch.bool)[None] & (queries == -2)  # padding attends to itself: no empty row
    steps = int(comp_len.max())
    t = torch.arange(steps)[None, :]
    predictor = torch.where(t == 0, (prompt_len.cpu() - 1)[:, None], start[:, None] + t - 1)
    predictor = torch.where(t < comp_len.cpu()[:, None], predictor, torch.zeros_like(predictor))
    return PackedGroups(ids.to(device), positions.to(device), allowed.to(device), predictor.to(device))


def attention_mask_4d(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """[G, 1, L, L] in the form the attention implementation takes: boolean for SDPA and flash-style
    kernels, additive (0 / dtype min) for eager attention."""
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]
    return allowed[:, None]
