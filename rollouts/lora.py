"""LoRA runs sync the adapter, not merged weights: the trainer's PEFT adapter as it travels to the
engines (`LoraAdapter`), and the Qwen2-Audio class through which vLLM serves it.

Only the adapter trains (PEFT freezes every other weight), so it is the whole update: a few MB
where merged layers were most of the model, and no dense reload in the engines.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from speechrl.rlhf.model.backbone import hub_state_dict

PEFT_PREFIX = "base_model.model."  # PEFT's name prefix; vLLM's loader strips it


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter: its tensors in vLLM's naming and its PEFT config."""

    tensors: dict[str, torch.Tensor]  # base_model.model.<hub-layout module>.lora_{A,B}.weight, on the CPU
    config: dict  # adapter_config.json's content (r, lora_alpha, target_modules, ...)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def save(self, path: Path) -> Path:
        """The directory layout PEFT's save_pretrained writes, which vLLM loads adapters from."""
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file({k: t.contiguous() for k, t in self.tensors.items()}, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(self.config, indent=1))
        return path


def lora_adapter(peft_model, state: dict | None = None) -> LoraAdapter:
    """The adapter of a PEFT model (`get_peft_model`), detached CPU copies in the hub layout; read from
    `state` (its full state dict) when given: a sharded model's gathered weights.

    PEFT names tensors after transformers 5's in-memory modules (model.language_model.*); vLLM's
    Qwen2-Audio has the hub layout (language_model.model.*), as dense syncs do (hub_state_dict).
    """
    from peft import get_peft_model_state_dict

    if not hasattr(peft_model, "peft_config"):
        raise TypeError(f"lora_adapter: expected a PEFT model (peft.get_peft_model), got {type(peft_model).__name__}")
    # anything else that trains would never reach the engines (PEFT's modules_to_save, say)
    extra = [n for n, p in peft_model.named_parameters() if p.requires_grad and ".lora_" not in n]
    if extra:
        raise ValueError(f"lora_adapter: {len(extra)} trainable weights outside the adapter ({extra[0]}, ...) would "
                         "not reach the rollout engines; freeze them or train without model.lora")
    state = get_peft_model_state_dict(peft_model, state_dict=state)
    tensors = {PEFT_PREFIX + name: t.detach().to("cpu", copy=True) for name, t in
               hub_state_dict((k.removeprefix(PEFT_PREFIX), v) for k, v in state.items())}
    config = peft_model.peft_config["default"].to_dict()
    return LoraAdapter(tensors, {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()})


def adapter_dir() -> Path:
    """An empty directory for this engine process's adapters, on tmpfs where there is one (an adapter
    is rewritten at every sync). Directories of engine processes that are gone are removed first:
    a killed Ray actor never cleans up, and tmpfs is memory."""
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    for old in root.glob("speechrl-lora-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = root / f"speechrl-lora-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def engine_lora_rank(r: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts (it takes a fixed set) that holds rank-`r` adapters."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    ranks = get_args(MaxLoRARanks)
    if r > max(ranks):
        raise ValueError(f"model.lora.r={r}: vLLM serves adapters up to rank {max(ranks)}; lower model.lora.r")
    return min(k for k in ranks if k >= r)


_REGISTERED = False


def register_lora_model() -> None:
    """Make vLLM build Qwen2-Audio with LoRA support; call in the engine's process before `LLM()`. Idempotent.

    vLLM 0.32's Qwen2AudioForConditionalGeneration lacks SupportsLoRA; this subclass adds what its
    audioflamingo3 model (the same decoder, tower and projector) declares, so vLLM's own LoRA layers
    and loader do the rest. The multimodal processor is inherited.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm import ModelRegistry
    from vllm.model_executor.models.interfaces import SupportsLoRA
    from vllm.model_executor.models.module_mapping import MultiModelKeys
    from vllm.model_executor.models.qwen2_audio import Qwen2AudioForConditionalGeneration

    class Qwen2AudioWithLoRA(Qwen2AudioForConditionalGeneration, SupportsLoRA):
        # vLLM fuses these projections; PEFT's per-projection adapters are stacked into them
        # (a projection without one gets a zero delta)
        packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

        def get_mm_mapping(self) -> MultiModelKeys:
            # adapters on the decoder only; without this vLLM would wrap the audio tower's layers too
            return MultiModelKeys.from_string_field(language_model="language_model.",
                                                    connector="multi_modal_projector.", tower_model="audio_tower.")

    ModelRegistry.register_model("Qwen2AudioForConditionalGeneration", Qwen2AudioWithLoRA)
    _REGISTERED = True
