"""How the trainer's weights reach the rollout engines: transports found by name.

`send(weights, workers)` blocks until every engine has loaded them: hub-layout tensors through vLLM's
in-place `reload_weights`, or, in LoRA runs, the adapter alone (rollouts/lora.py) through vLLM's LoRA
loading. "object_store" suits CPU and one machine, where Ray's store is shared memory. For separate
GPUs, vLLM 0.32's weight-transfer engines (vllm/distributed/weight_transfer/, "nccl", "ipc") would
slot in as another transport for dense weights (they cannot carry adapters, which are small enough
for the object store); not built here, as there is no GPU to test them on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

from speechrl.rlhf.core.registry import Registry
from speechrl.rollouts.engine import RolloutWorkerDied
from speechrl.rollouts.lora import LoraAdapter

TRANSPORTS: Registry = Registry("weight transport")


@dataclass(frozen=True)
class StoredWeights:
    """Hub-layout weights that the policy worker put in Ray's object store itself
    (PolicyWorker.stored_weights): the driver passes this reference on and never holds the tensors,
    so a sync copies them once into the store instead of worker -> driver -> store."""

    ref: Any  # a ray.ObjectRef to [(name, tensor), ...]


@TRANSPORTS.register("object_store")
class ObjectStoreTransport:
    """Put the weights in Ray's object store once; every worker loads them from there."""

    def send(self, weights: Iterable[tuple[str, torch.Tensor]] | StoredWeights | LoraAdapter, workers: list) -> None:
        import ray
        from ray.exceptions import RayActorError

        if isinstance(weights, StoredWeights):  # in the store already
            ref, load = weights.ref, "load_weights"
        elif isinstance(weights, LoraAdapter):  # already detached CPU copies (lora_adapter)
            ref, load = ray.put(weights), "load_adapter"
        else:  # detached CPU copies: a tensor that requires grad or lives on a GPU does not pickle cheaply
            ref, load = ray.put([(name, t.detach().to("cpu")) for name, t in weights]), "load_weights"
        futures = [getattr(w, load).remote(ref) for w in workers]  # Ray passes the resolved object
        for k, future in enumerate(futures):
            try:
                ray.get(future)
            except RayActorError as e:
                raise RolloutWorkerDied(k, e, during="the weight sync") from e
