"""build_policy: the trainable policy SFT and the GRPO policy worker share."""
from __future__ import annotations

import torch

from speechrl.rlhf.policy import build_policy, save_policy


def test_resumed_policy_keeps_the_starting_weights_as_kl_reference(sft_config, sft_assets, tmp_path):
    cfg = sft_config("policy", "train.steps=2")
    base = sft_assets[0]
    first = build_policy(cfg, base, with_reference=True)
    with torch.no_grad():  # stand in for training: the saved policy differs from the base
        for p in first.model.parameters():
            p.add_(0.01)
    checkpoint = tmp_path / "step-1"
    save_policy(first.model, first.backbone.processor, first.optimizer, checkpoint, lora=False)

    resumed = build_policy(cfg, base, checkpoint, with_reference=True)
    name, trained = next(iter(resumed.model.state_dict().items()))
    assert torch.allclose(trained, first.model.state_dict()[name]), "resume loads the checkpoint's weights"
    reference = resumed.reference.state_dict()[name]
    assert torch.allclose(reference, first.reference.state_dict()[name]), "reference is the run's start"
    assert not torch.allclose(reference, trained)
    assert not any(p.requires_grad for p in resumed.reference.parameters())
