"""How the trainer's weights reach the rollout engines: transports found by name.

`send(named_tensors, workers)` blocks until every engine has loaded them through vLLM's in-place
`reload_weights`. "object_store" suits CPU and one machine, where Ray's store is shared memory. For
separate GPUs, vLLM 0.32's weight-transfer engines (vllm/distributed/weight_transfer/, "nccl", "ipc")
would slot in as another transport; not built here, as there is no GPU to test them on.
"""
from __future__ import annotations

from typing import Iterable

import torch

from speechrl.rlhf.model.backbone import hub_state_dict
from speechrl.rlhf.core.registry import Registry
from speechrl.rollouts.engine import RolloutWorkerDied

TRANSPORTS: Registry = Registry("weight transport")


@TRANSPORTS.register("object_store")
class ObjectStoreTransport:
    """Put the weights in Ray's object store once; every worker loads them from there."""

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], workers: list) -> None:
        import ray
        from ray.exceptions import RayActorError

        # detached CPU copies: a tensor that requires grad or lives on a GPU does not pickle cheaply
        ref = ray.put([(name, t.detach().to("cpu")) for name, t in named_tensors])
        futures = [w.load_weights.remote(ref) for w in workers]  # Ray passes the resolved list
        for k, future in enumerate(futures):
            try:
                ray.get(future)
            except RayActorError as e:
                raise RolloutWorkerDied(k, e, during="the weight sync") from e


# vLLM fuses these projections into one tensor (Qwen2's packed_modules_mapping); reloading a
# fused layer from only some of its parts leaves the others uninitialized, so a part that
# carries LoRA brings its siblings along.
FUSED_SIBLINGS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})


def merged_lora_state(peft_model) -> list[tuple[str, torch.Tensor]]:
    """The weights of the LoRA-carrying layers (and their fused siblings), adapters merged in.

    Only those layers changed since the base weights were loaded, so a LoRA run syncs this
    subset instead of the whole model. Names are in the hub layout (no `base_model.model.`,
    no `.base_layer`); the model is left unmerged, as training expects.
    """
    from peft.tuners.lora import LoraLayer

    if not hasattr(peft_model, "merge_adapter"):
        raise TypeError(f"merged_lora_state: expected a PEFT model (peft.get_peft_model), "
                        f"got {type(peft_model).__name__}")
    prefix = "base_model.model."
    peft_model.merge_adapter()
    try:
        modules = {}  # module name -> linear layer to read, deduplicated across siblings
        for name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            parent, _, leaf = name.rpartition(".")
            group = next((g for g in FUSED_SIBLINGS if leaf in g), {leaf})
            for sibling in group:
                layer = peft_model.get_submodule(f"{parent}.{sibling}")
                modules[f"{parent}.{sibling}"] = layer.get_base_layer() if isinstance(layer, LoraLayer) else layer
        named = []
        for name, layer in modules.items():
            base = name[len(prefix):] if name.startswith(prefix) else name
            for param_name, tensor in layer.named_parameters(recurse=False):
                named.append((f"{base}.{param_name}", tensor.detach().clone()))
    finally:
        peft_model.unmerge_adapter()
    if not named:
        raise ValueError("merged_lora_state: the model has no LoRA layers; sync the full state dict instead")
    return list(hub_state_dict(named))
