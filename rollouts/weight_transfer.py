"""The trainer's weights to the engines through vLLM's weight-transfer engines, sent by the trainer itself.

vLLM 0.32 (vllm/distributed/weight_transfer/) has the whole round trip: a trainer-side engine that
opens a process group with the inference workers and broadcasts the weights, a worker-side engine
that receives them into the model through the layerwise reload, and the four calls between them
(init, start, update, finish). speechrl uses it as it is, with three small additions:

- **Several engines.** vLLM's trainer gives every inference worker the same rank offset (1), right
  for one engine; `EnginesClient` gives engine k the offset 1 + (tensor-parallel ranks before it),
  so any number of engines join one group (vLLM's own `RayVLLMWeightSyncClient` sends every handle
  the same init info, which is why this one is written here).
- **The policy as a source.** `PolicySource` replays the policy worker's hub-layout tensors each
  round (on several FSDP ranks the gather is a collective: every rank iterates, rank 0 sends).
- **A CPU backend, "gloo".** NCCL and CUDA IPC need GPUs. `GlooWeightTransferEngine` and its trainer
  twin are vLLM's NCCL engines with the communicator swapped for a gloo process group (and tensors
  sent one by one: vLLM's packed path runs on CUDA streams). Everything else, the handshake, the
  update info, the layerwise reload, the checks, is vLLM's code, so CPU tests exercise the path a
  GPU run takes up to the wire.

Backends (rollout.weight_transport; "transfer" picks by layout): "nccl" for engines on their own GPUs,
"ipc" for engines sharing the trainer's GPU (NCCL cannot put two ranks on one device), "gloo" on CPU.
LoRA adapters and MTP draft heads still go through Ray's object store (rollouts/sync.py): vLLM's
weight transfer loads the main model's weights only.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, ClassVar, Iterator, Optional

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, TrainerInitInfo, WeightSource
from vllm.distributed.weight_transfer.nccl_engine import (NCCLTrainerWeightTransferEngine, NCCLWeightTransferEngine,
                                                          NCCLWeightTransferInitInfo)

from speechrl.rollouts.engine import WEIGHT_TRANSFER

GLOO = "speechrl_gloo"  # the gloo backend's name in vLLM's registries
GLOO_TIMEOUT_S = 600  # a peer that stops answering fails the sync after this long (NCCL would wait forever)


# --- the gloo backend ----------------------------------------------------------------------------------
def _gloo_group(address: str, port: int, rank: int, world_size: int, timeout_s: int):
    """A gloo process group of its own (the trainer's default group, if any, is untouched)."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(address, port, rank, world_size, "gloo",
                                                          timeout=timedelta(seconds=timeout_s))


def _broadcast(group, tensor: torch.Tensor) -> None:
    """From the group's rank 0 (the trainer). The group's own broadcast: torch.distributed.broadcast
    would read `src` as a rank of the default group, which a stateless group is not part of."""
    from torch.distributed import BroadcastOptions

    options = BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


@dataclass(kw_only=True)
class GlooInitInfo(NCCLWeightTransferInitInfo):
    """The worker side's init info: vLLM's NCCL one (TCP rendezvous) plus the gloo timeout."""

    timeout_s: int = GLOO_TIMEOUT_S


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """The trainer side's: where rank 0 listens, the group's size (and `rank`, this trainer rank)."""

    backend: ClassVar[str] = GLOO
    master_address: str
    master_port: int
    world_size: int
    timeout_s: int = GLOO_TIMEOUT_S


class GlooWeightTransferEngine(NCCLWeightTransferEngine):
    """vLLM's NCCL worker engine (start: layerwise reload; finish: its finalization) over gloo."""

    init_info_cls = GlooInitInfo

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        self.packed = False
        rank = self.parallel_config.data_parallel_index * self.parallel_config.world_size + self.parallel_config.rank
        self.model_update_group = _gloo_group(init_info.master_address, init_info.master_port,
                                              rank + init_info.rank_offset, init_info.world_size, init_info.timeout_s)

    def receive_weights(self, update_info) -> None:
        if self.model_update_group is None:
            raise RuntimeError("gloo weight transfer: init_weight_transfer_engine first")
        for name, dtype_name, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes):
            weight = torch.empty(shape, dtype=getattr(torch, dtype_name), device=self.device)
            _broadcast(self.model_update_group, weight)
            self.model.load_weights([(name, weight)])

    def shutdown(self) -> None:
        self.model_update_group = None  # a gloo group closes when dropped


class GlooTrainerWeightTransferEngine(NCCLTrainerWeightTransferEngine):
    """vLLM's NCCL trainer engine (handshake, update info, concurrent update call, checks) over gloo."""

    init_info_cls = GlooTrainerInitInfo

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source: Optional[WeightSource] = None):
        from concurrent.futures import ThreadPoolExecutor

        engine = cls(client=client, source=source, is_sender=init_info.is_sender, packed=False)
        if not engine.is_sender:
            return engine
        worker_info = {"master_address": init_info.master_address, "master_port": init_info.master_port,
                       "rank_offset": 1, "world_size": init_info.world_size, "timeout_s": init_info.timeout_s}
        with ThreadPoolExecutor(max_workers=1) as pool:  # the workers wait in the rendezvous with rank 0
            future = pool.submit(client.init_weight_transfer_engine, worker_info)
            engine.model_update_group = _gloo_group(init_info.master_address, init_info.master_port, 0,
                                                    init_info.world_size, init_info.timeout_s)
            future.result()
        return engine

    def _broadcast(self, source: WeightSource, meta: list[ParamMeta]) -> None:
        if not self.is_sender:
            for _ in source:  # the other ranks take part in the gather only
                pass
            return
        for _name, tensor in self._checked_iter(source, meta):
            _broadcast(self.model_update_group, tensor.detach().to("cpu").contiguous())

    def shutdown(self) -> None:
        self.model_update_group = None


def register_gloo() -> None:
    """Make "speechrl_gloo" known to vLLM's engine factories in this process (idempotent). An engine
    must have it registered before it starts: vLLM builds the worker's engine while loading the model."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    for factory, engine in ((WeightTransferEngineFactory, GlooWeightTransferEngine),
                            (WeightTransferTrainerFactory, GlooTrainerWeightTransferEngine)):
        if GLOO not in factory._registry:
            factory.register_engine(GLOO, engine)


def vllm_backend(transport: str) -> str:
    """The vLLM backend name of a rollout.weight_transport that sends through weight transfer."""
    if transport not in WEIGHT_TRANSFER:
        raise ValueError(f"{transport!r} is not a weight-transfer transport; use one of {WEIGHT_TRANSFER}")
    return GLOO if transport == "gloo" else transport


# --- the trainer's side ------------------------------------------------------------------------------
class PolicySource(WeightSource):
    """The policy's weights as vLLM's trainer engine reads them, fresh each round: `weights()` returns
    hub-layout (name, tensor) pairs, or None on a trainer rank that holds none after the gather."""

    def __init__(self, weights: Callable[[], Optional[list[tuple[str, torch.Tensor]]]],
                 device: Optional[torch.device] = None):
        self.weights, self.device, self._round = weights, device, None  # device: where the wire reads (GPU)

    def metadata(self) -> list[ParamMeta]:
        self._round = self.weights() or []  # the gather (a collective on several ranks), once a round
        return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in self._round]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        pairs = self._round if self._round is not None else (self.weights() or [])
        self._round = None
        for name, tensor in pairs:  # one at a time: a gathered copy moves to the GPU as it is sent
            yield name, tensor if self.device is None else tensor.to(self.device)


class EnginesClient:
    """vLLM's weight-sync client over speechrl's engine actors (RolloutEngine, which passes the calls to
    its LLM): every call goes to every engine and waits for all; at init, engine k is told its own
    rank offset (1 + the tensor-parallel ranks of the engines before it)."""

    def __init__(self, engines: list, tp_sizes: list[int]):
        self.engines = list(engines)
        self.offsets = [1 + sum(tp_sizes[:k]) for k in range(len(engines))]

    def _each(self, method: str, payloads: list[Any]) -> None:
        import ray

        ray.get([getattr(e, method).remote(*p) for e, p in zip(self.engines, payloads)])

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        offsets = self.offsets if "rank_offset" in init_info else [None] * len(self.engines)  # IPC has none
        self._each("init_weight_transfer_engine", [({"init_info": init_info if off is None else
                                                     {**init_info, "rank_offset": off}},) for off in offsets])

    def start_weight_update(self) -> None:
        self._each("start_weight_update", [()] * len(self.engines))

    def update_weights(self, update_info) -> None:
        self._each("update_weights", [({"update_info": update_info},)] * len(self.engines))

    def finish_weight_update(self, weight_version: Optional[str] = None) -> None:
        self._each("finish_weight_update", [()] * len(self.engines))


def trainer_engine(transport: str, engines: list, tp_sizes: list[int], source: PolicySource, *, rank: int,
                   address: str, port: int, timeout_s: int = GLOO_TIMEOUT_S):
    """The trainer rank's side of a weight-transfer group with `engines` (rank 0 of the group sends;
    other trainer ranks only take part in the gather). Blocks until every engine has joined."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    world_size = 1 + sum(tp_sizes)
    backend = vllm_backend(transport)  # refuses a name that is not a weight-transfer backend
    if backend == GLOO:
        register_gloo()
        info = GlooTrainerInitInfo(master_address=address, master_port=port, world_size=world_size, rank=rank,
                                   timeout_s=timeout_s)
    elif backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        info = NCCLTrainerInitInfo(master_address=address, master_port=port, world_size=world_size, rank=rank)
    else:
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        info = IPCTrainerInitInfo(rank=rank)
    return WeightTransferTrainerFactory.trainer_init(info, client=EnginesClient(engines, tp_sizes), source=source)
