"""Weight-transport registry and the LoRA adapter as it leaves the trainer (no vLLM, no Ray)."""
from __future__ import annotations

import json

import pytest
import torch

from speechrl.rlhf.model.backbone import hub_state_dict, load_backbone
from speechrl.rollouts.lora import lora_adapter
from speechrl.rollouts.sync import TRANSPORTS, ObjectStoreTransport


def test_transports_registered_by_name():
    from speechrl.rlhf.core.config import RolloutConfig
    from speechrl.rollouts.sync import WeightTransferTransport

    assert TRANSPORTS.get("object_store") is ObjectStoreTransport and not ObjectStoreTransport.direct
    for name in ("nccl", "ipc", "gloo", "transfer"):  # vLLM's weight transfer: the policy worker sends
        transport = TRANSPORTS.get(name)(RolloutConfig(tensor_parallel_size=2))
        assert isinstance(transport, WeightTransferTransport) and transport.direct
        assert (transport.backend, transport.tp) == (name, 2)
    with pytest.raises(KeyError, match="unknown weight transport 'shm'; registered: gloo, ipc, nccl, object_store, transfer"):
        TRANSPORTS.get("shm")


def test_lora_adapter_is_the_adapter_alone_in_hub_layout(tiny_backbone_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = load_backbone(tiny_backbone_dir).model
    hub = {n for n, _ in hub_state_dict(model.state_dict().items())}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8,
                                                  target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    adapter = lora_adapter(peft_model)

    layers = model.config.text_config.num_hidden_layers
    assert set(adapter.tensors) == {f"base_model.model.language_model.model.layers.{i}.self_attn.{p}.lora_{ab}.weight"
                                    for i in range(layers) for p in ("q_proj", "v_proj") for ab in "AB"}
    assert not set(adapter.tensors) & hub
    q = peft_model.base_model.model.model.language_model.layers[0].self_attn.q_proj
    sent = adapter.tensors["base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    torch.testing.assert_close(sent, q.lora_A["default"].weight)
    assert not sent.requires_grad and sent.data_ptr() != q.lora_A["default"].weight.data_ptr(), "a copy"
    # what vLLM reads from the directory: PEFT's file names, and r / lora_alpha / target_modules
    path = adapter.save(tmp_path / "adapter")
    config = json.loads((path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["target_modules"] == r".*language_model.*\.(q_proj|v_proj)"
    assert (path / "adapter_model.safetensors").is_file()


def test_lora_adapter_refuses_what_it_cannot_send(tiny_backbone_dir):
    from peft import LoraConfig, get_peft_model

    with pytest.raises(TypeError, match="expected a PEFT model .* got Linear"):
        lora_adapter(torch.nn.Linear(2, 2))
    peft_model = get_peft_model(load_backbone(tiny_backbone_dir).model,
                                LoraConfig(r=4, target_modules=r".*language_model.*\.q_proj"))
    peft_model.base_model.model.lm_head.requires_grad_(True)  # trains, but is not in the adapter
    with pytest.raises(ValueError, match="trainable weights outside the adapter .*lm_head"):
        lora_adapter(peft_model)


def test_engine_lora_rank_is_the_smallest_vllm_accepts():
    from speechrl.rollouts.lora import engine_lora_rank

    assert [engine_lora_rank(r) for r in (1, 4, 8, 16, 17, 512)] == [1, 8, 8, 16, 32, 512]
    with pytest.raises(ValueError, match="model.lora.r=600: vLLM serves adapters up to rank 512"):
        engine_lora_rank(600)


def test_adapter_dir_is_per_process_and_sweeps_dead_engines():
    import os
    import subprocess
    import sys

    from speechrl.rollouts.lora import adapter_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    mine = adapter_dir()
    left = mine.parent / f"speechrl-lora-{dead}"
    (left / "v3").mkdir(parents=True)  # what a killed engine leaves
    (mine / "v1").mkdir()
    again = adapter_dir()
    assert again == mine and again.name == f"speechrl-lora-{os.getpid()}"
    assert not left.exists() and list(again.iterdir()) == []
    again.rmdir()
