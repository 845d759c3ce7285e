"""How the trainer's weights reach the rollout engines: transports found by name (rollout.weight_transport).

- "object_store" (the default): the policy worker puts its hub-layout tensors in Ray's object store
  once, every engine loads them through vLLM's in-place `reload_weights`. Suits CPU and one machine,
  where Ray's store is shared memory, and async rollouts, which publish snapshots.
- "transfer": vLLM's weight-transfer engines (rollouts/weight_transfer.py) with the backend the run
  needs: "nccl" for engines on GPUs of their own (ray.layout=separate), "ipc" for engines sharing the
  trainer's GPU (colocated), "gloo" on CPU; each can also be named. The policy worker broadcasts to
  the engines itself, nothing passes through the driver or the store.

LoRA runs send the adapter alone by the object store whatever the transport (rollouts/lora.py, vLLM's
LoRA loading): weight transfer carries dense weights only, and an adapter is small.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

from speechrl.rlhf.core.registry import Registry
from speechrl.rollouts.engine import WEIGHT_TRANSFER, RolloutWorkerDied
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

    direct = False  # the driver hands over what to send (OnlineRecipe.sync)

    def __init__(self, rollout=None):
        pass

    def check(self, cfg, placement) -> None:
        pass

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


class WeightTransferTransport:
    """vLLM's weight transfer with `backend` ("nccl", "ipc", "gloo"): the policy worker sends its weights
    to the engines itself (`sync`). The group is formed on the first sync and again whenever the engines
    change (a dead one replaced); an engine that dies during a sync is named (RolloutWorkerDied), so the
    run replaces it and syncs again. Weights given explicitly (a LoRA adapter) go by the object store."""

    direct = True

    def __init__(self, backend: str, rollout=None):
        self.backend = backend  # "transfer" until check() picks one for the machine and layout
        self.tp = 1 if rollout is None else rollout.tensor_parallel_size
        self.connected: list = []  # the engines the current group was formed with

    def check(self, cfg, placement) -> None:
        """Before anything starts: the backend fits the machine, the layout and the loop."""
        import torch

        from speechrl.rlhf.core.config import RecipeError

        name = f"rollout.weight_transport={self.backend}"
        gpu = placement.on_gpu and torch.cuda.is_available()
        want = {"separate": "nccl", "colocated": "ipc"}.get(placement.layout)  # on GPUs
        if self.backend == "transfer":
            self.backend = want if gpu else "gloo"
        if cfg.rollout.async_.enabled:
            raise RecipeError(f"{name} sends from the policy worker at each sync; async rollouts (rollout.async) "
                              "load published snapshots while the trainer updates. Use rollout.weight_transport="
                              "object_store with async, or rollout.async.enabled=false")
        if self.backend == "gloo" and gpu:
            raise RecipeError(f"{name} is the CPU backend; on GPUs use nccl (ray.layout=separate) or ipc (colocated)")
        if self.backend in ("nccl", "ipc") and not gpu:
            raise RecipeError(f"{name} needs CUDA GPUs for the policy and the engines; on CPU use "
                              "rollout.weight_transport=gloo or object_store")
        if self.backend in ("nccl", "ipc") and self.backend != want:
            raise RecipeError(f"{name} does not fit ray.layout={placement.layout}: NCCL needs the engines on GPUs "
                              f"of their own (separate), CUDA IPC on the trainer's GPU (colocated). Use "
                              f"rollout.weight_transport={want}")

    def send(self, weights, workers: list) -> None:
        ObjectStoreTransport().send(weights, workers)

    def sync(self, policy, workers: list) -> None:
        """The policy's weights (all ranks gather, rank 0 sends) to every engine; MTP draft heads after
        them by the object store (vLLM's weight transfer loads the main model only)."""
        if [id(w) for w in workers] != [id(w) for w in self.connected]:
            self._guard(workers, lambda: policy.connect_engines(workers, self.backend, [self.tp] * len(workers)))
            self.connected = list(workers)
        heads = self._guard(workers, policy.push_weights)
        if heads is not None:
            self.send(heads, workers)

    def _guard(self, workers: list, call):
        """`call()`; if it fails because an engine died, which one (RolloutWorkerDied), so the run
        replaces it; the next sync forms the group again with the new one."""
        import ray
        from ray.exceptions import RayActorError

        try:
            return call()
        except Exception as e:  # noqa: BLE001 - the policy worker reports an engine's death as its own error
            for k, w in enumerate(workers):
                try:
                    ray.get(w.ping.remote(), timeout=30)
                except (RayActorError, ray.exceptions.GetTimeoutError) as dead:
                    self.connected = []
                    raise RolloutWorkerDied(k, dead, during="the weight sync") from e
            raise


for _backend in (*WEIGHT_TRANSFER, "transfer"):
    TRANSPORTS.register(_backend)(lambda rollout=None, _b=_backend: WeightTransferTransport(_b, rollout))
