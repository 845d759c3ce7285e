"""Weight-transport registry and the LoRA merged-state helper (no vLLM, no Ray)."""
from __future__ import annotations

import pytest
import torch

from speechrl.rlhf.model.backbone import hub_state_dict, load_backbone
from speechrl.rollouts.sync import TRANSPORTS, ObjectStoreTransport, merged_lora_state


def test_transports_registered_by_name():
    assert TRANSPORTS.get("object_store") is ObjectStoreTransport
    with pytest.raises(KeyError, match="unknown weight transport 'nccl'; registered: object_store"):
        TRANSPORTS.get("nccl")


def test_merged_lora_state_is_base_plus_delta_in_hub_layout(tiny_backbone_dir):
    from peft import LoraConfig, get_peft_model

    model = load_backbone(tiny_backbone_dir).model
    base = {n: t.clone() for n, t in hub_state_dict(model.state_dict().items())}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8,
                                                  target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)

    state = dict(merged_lora_state(peft_model))
    layers = model.config.text_config.num_hidden_layers
    # q and v carry LoRA; k rides along because vLLM fuses q/k/v into one tensor
    expected = {f"language_model.model.layers.{i}.self_attn.{p}.{w}" for i in range(layers)
                for p in ("q_proj", "k_proj", "v_proj") for w in ("weight", "bias")}
    assert set(state) == expected
    q = peft_model.base_model.model.model.language_model.layers[0].self_attn.q_proj
    delta = (q.lora_B["default"].weight @ q.lora_A["default"].weight) * q.scaling["default"]
    name = "language_model.model.layers.0.self_attn.{}.weight"
    torch.testing.assert_close(state[name.format("q_proj")], base[name.format("q_proj")] + delta)
    torch.testing.assert_close(state[name.format("k_proj")], base[name.format("k_proj")])
    # left unmerged: the base weights are untouched for training
    assert not q.merged
    torch.testing.assert_close(q.base_layer.weight, base[name.format("q_proj")])


def test_merged_lora_state_names_a_non_peft_model():
    with pytest.raises(TypeError, match="expected a PEFT model .* got Linear"):
        merged_lora_state(torch.nn.Linear(2, 2))
