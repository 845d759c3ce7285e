"""The trainer ranks' process group: `train.num_ranks` policy workers, one Ray actor each, joined by
torch.distributed (gloo on CPU, NCCL on GPU) before the model is built and sharded (model/sharding.py).

Rank 0's address comes from a zero-CPU Ray task in rank 0's bundle, so it is the node that actor lands
on, in one cluster or across nodes; the port is one that node had free a moment before.
"""
from __future__ import annotations

import datetime
import socket

import torch

# a collective that waits this long is a dead or stuck rank: long enough for a slow step on CPU
TIMEOUT = datetime.timedelta(minutes=30)


def free_address() -> str:
    """host:port of this node with the port free (run as a Ray task where rank 0 will be)."""
    import ray

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"{ray.util.get_node_ip_address()}:{port}"


def rank0_address(options: dict) -> str:
    """The rendezvous address for a group whose rank 0 is placed by Ray `options` (a placement bundle)."""
    import ray

    where = {k: v for k, v in options.items() if k == "scheduling_strategy"}
    return ray.get(ray.remote(free_address).options(num_cpus=0, **where).remote())


def join(rank: int, world: int, address: str, device: torch.device) -> None:
    """Join the trainer ranks' process group (a no-op for one rank)."""
    import torch.distributed as dist

    if world == 1:
        return
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a group of {world}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=world, timeout=TIMEOUT,
                            device_id=device if device.type == "cuda" else None)


def my_share(parts: list, rank: int, world: int) -> list[tuple[object, bool]]:
    """Rank `rank`'s share of `parts` (micro-batches): every world-th from its own, as (part, real). Every
    rank gets the same count, since their forward and backward passes pair up in collectives: a rank
    short of one repeats parts[0] with real=False, to run with weight 0."""
    rounds = -(-len(parts) // world)
    return [(parts[i], True) if i < len(parts) else (parts[0], False) for i in range(rank, rounds * world, world)]
