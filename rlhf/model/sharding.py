"""Several trainer ranks: the backbone sharded with torch's FSDP2 (`fully_shard`) across a process group.

Each rank holds a 1/N slice of every sharded weight, its gradient and AdamW's moments (ZeRO-3); a
forward pass gathers a unit's weights, a backward pass reduce-scatters its gradients, summed over
ranks (the losses are already weighted by each micro-batch's share of the whole batch). gloo on CPU,
NCCL on GPU: the process group is the worker's (workers/ranks.py); nothing here sends a tensor itself.

Why FSDP2 rather than DeepSpeed for N ranks: the forward passes call the backbone's parts directly
(logprobs.py encodes each clip once, runs a prompt once for its samples), which ZeRO-3's and FSDP's
module hooks both have to see. FSDP2's units are plain modules, and torch's state-dict API gathers
full weights for the engines and the checkpoints without a conversion step. Units:

- each decoder layer;
- the token embeddings and the audio projector, each a unit of its own, since they run before the
  root's forward (a root unit's weights are freed once the backward is through the root's forward,
  before their backward); they stay gathered from their first call to their backward, as the
  projector runs once per distinct clip, a count that differs between ranks;
- the audio tower as one unit when it trains; a frozen tower is left out (`ignored_params`, a full
  copy per rank): its outputs are cached per rank (tower_cache.py), so one rank may skip the tower
  while another runs it, and a unit's gather must happen on every rank;
- the trunk (the rest of the audio model: the decoder's final norm), which the critic runs alone;
- the root: the LM head. Its first forward lazily initializes every unit.

Every rank must run the same number of forward and backward passes (they pair up in collectives):
the policy worker pads a rank's share of micro-batches with weight-0 repeats (workers/policy_worker.py).
"""
from __future__ import annotations

import torch

from speechrl.rlhf.model.logprobs import audio_model, unwrap


def sharded() -> bool:
    """True inside a process group of more than one rank (the policy worker's, workers/ranks.py)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """Shard a backbone (under its PEFT wrapper, if any) in place across the process group; returns it."""
    from torch.distributed.fsdp import fully_shard

    base = unwrap(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    if base.config.get_text_config().tie_word_embeddings:
        raise ValueError("train.num_ranks > 1 shards the token embeddings and the LM head separately, so they "
                         "must not be tied: untie them (text_config.tie_word_embeddings=false)")
    inner = audio_model(base)
    tower = inner.audio_tower
    ignored = set()
    if any(p.requires_grad for p in tower.parameters()):
        fully_shard(tower, reshard_after_forward=True)
    else:
        ignored = set(tower.parameters())
    for layer in inner.language_model.layers:
        fully_shard(layer)
    # run before the root's forward, so units of their own; kept gathered from their first call to the
    # backward, since the projector runs once per distinct clip, a count that differs between ranks
    for part in (inner.get_input_embeddings(), inner.multi_modal_projector):
        fully_shard(part, reshard_after_forward=False)
    fully_shard(inner, ignored_params=ignored)  # the trunk: the critic runs it without the LM head
    fully_shard(base)
    _sum_gradients(base)
    _lazy_init(base)
    return model


def shard_module(module: torch.nn.Module) -> torch.nn.Module:
    """A small module trained beside the backbone (PPO's value head) as a unit of its own."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(module)
    _sum_gradients(module)
    return module


def _sum_gradients(model: torch.nn.Module) -> None:
    """Every unit sums its gradients over the ranks instead of averaging: the losses carry their weights
    in the whole batch already. A plain SUM (no pre-scaled reduction, which gloo lacks)."""
    from torch.distributed.fsdp import FSDPModule

    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)


def _lazy_init(base) -> None:
    """FSDP2 makes the first unit whose forward runs the root, and expects that to be the model: run
    one token through it before the embeddings or the projector are ever called on their own."""
    device = next(p.device for p in base.parameters())
    with torch.no_grad():
        base(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    _reshard(base)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights of a sharded model on CPU, keyed as its unsharded state dict (every rank calls
    this: it is a collective; rank 0 gets the tensors, the others an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    _reshard(model)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _reshard(model: torch.nn.Module) -> None:
    """Free every unit's gathered weights. A forward without a backward (evaluation, the critic's
    values, the lazy init) leaves the root and the units kept gathered as they are; a state dict taken
    then would swap the sharded weights in under them, and the next step would train stale copies."""
    from torch.distributed.fsdp import FSDPModule

    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def full_optimizer_state(state: dict) -> dict:
    """`optimizer.state_dict()` with each sharded moment gathered to its full tensor on CPU: the format a
    one-rank run saves, so a checkpoint resumes on any number of ranks (a collective: every rank calls)."""
    from torch.distributed.tensor import DTensor

    # new dicts: optimizer.state_dict() hands out the live per-parameter state
    return {**state, "state": {index: {key: value.full_tensor().cpu() if isinstance(value, DTensor) else value
                                       for key, value in param_state.items()}
                               for index, param_state in state["state"].items()}}


def shard_optimizer_state(state: dict, params: list[torch.nn.Parameter]) -> dict:
    """The inverse: full moments (as `full_optimizer_state` or a one-rank run saved them) cut to this
    rank's slice of each sharded parameter; `params` in the optimizer's order (its state's integer ids)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for index, param_state in state["state"].items():
        param = params[int(index)]
        if not isinstance(param, DTensor):
            continue
        for key, value in param_state.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                # src_data_rank=None: every rank holds the full tensor already, each keeps its slice
                param_state[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                                     src_data_rank=None)
    return state
