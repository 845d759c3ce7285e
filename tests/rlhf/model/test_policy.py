"""build_policy: the trainable policy SFT and the GRPO policy worker share."""
from __future__ import annotations

import pytest
import torch

from speechrl.rlhf.core.config import RecipeError, load_recipe
from speechrl.rlhf.core.devices import compute_dtype, train_device
from speechrl.rlhf.model.policy import build_policy, save_policy


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


def test_a_resumed_lora_run_keeps_its_checkpoints_mtp_heads(sft_config, sft_assets, tmp_path):
    """LoRA resumes from the base weights plus the adapter; the MTP heads come from the checkpoint."""
    cfg = sft_config("lora-heads", "model.lora.enabled=true", "model.lora.r=4", "model.mtp.num_heads=2")
    first = build_policy(cfg, sft_assets[0])
    with torch.no_grad():  # stand in for training
        for p in first.mtp.parameters():
            p.add_(0.01)
    checkpoint = tmp_path / "step-1"
    save_policy(first.model, first.backbone.processor, first.optimizer, checkpoint, lora=True, mtp=first.mtp)
    resumed = build_policy(cfg, sft_assets[0], checkpoint)
    saved, loaded = first.mtp.state_dict(), resumed.mtp.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


def _grpo_like_batch(backbone, clips, n):
    """n completions of different lengths per clip, each row holding a reference to its prompt's clip
    (as GRPO's update does); clips of different lengths, so prompts differ in length too."""
    from speechrl.rlhf.model.prompts import render_prompt
    from speechrl.rlhf.model.logprobs import build_token_batch, prompt_ids_for

    proc = backbone.processor
    prompt = render_prompt(proc, "asr")
    gen = torch.Generator().manual_seed(0)
    prompts, completions, audios = [], [], []
    for clip in clips:
        ids = prompt_ids_for(proc, prompt, clip)
        for j in range(n):
            prompts.append(ids)
            completions.append(torch.randint(0, 300, (3 + j,), generator=gen).tolist())
            audios.append(clip)
    return prompts, completions, audios, build_token_batch(proc, prompts, completions, audios,
                                                          backbone.tokenizer.pad_token_id)


def test_shared_prompts_run_once_with_the_same_logprobs_and_grads(sft_assets):
    import numpy as np

    from speechrl.rlhf.model.backbone import load_backbone
    from speechrl.rlhf.model.logprobs import build_token_batch, token_logprobs

    backbone = load_backbone(sft_assets[0])
    rng = np.random.default_rng(0)
    clips = [rng.normal(0, 0.1, 16000 * s).astype(np.float32) for s in (1, 2)]
    prompts, completions, audios, shared = _grpo_like_batch(backbone, clips, n=3)
    assert shared.input_features.shape[0] == 2 and shared.audio_index.tolist() == [0, 0, 0, 1, 1, 1]
    # the same rows with a private copy of each clip run in full, each clip encoded for its row
    private = build_token_batch(backbone.processor, prompts, completions, [a.copy() for a in audios],
                                backbone.tokenizer.pad_token_id)
    assert private.audio_index is None and private.input_features.shape[0] == 6

    model = backbone.model
    grads = []
    for batch in (shared, private):
        model.zero_grad()
        logp = token_logprobs(model, batch)
        (logp * batch.completion_mask).sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        if batch is shared:
            first = logp.detach()
    mask = shared.completion_mask
    assert torch.equal(mask, private.completion_mask) and mask.sum() == sum(map(len, completions))
    assert torch.allclose(first[mask], logp.detach()[mask], atol=1e-5)
    assert bool((first[~mask] == 0).all()), "the shared-prompt path fills completion positions only"
    assert grads[0].keys() == grads[1].keys() and any("audio_tower" in k for k in grads[0])
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-5), k
    # gradient checkpointing rules out the KV cache: each prompt and its rows' completions run packed in
    # one sequence (model/packing.py), with the same logprobs, hidden states and gradients
    model.gradient_checkpointing_enable()
    model.zero_grad()
    checkpointed, hidden = token_logprobs(model, shared, with_hidden=True)
    (checkpointed * mask).sum().backward()
    assert torch.allclose(checkpointed.detach()[mask], first[mask], atol=1e-5)
    for k in grads[1]:
        assert torch.allclose(model.get_parameter(k).grad, grads[1][k], atol=1e-5), k
    model.gradient_checkpointing_disable()
    _, full_hidden = token_logprobs(model, private, with_hidden=True)
    assert torch.allclose(hidden[mask], full_hidden[mask], atol=1e-5)


def test_freeze_audio_encoder_trains_only_adaptor_and_decoder(sft_config, sft_assets):
    cfg = sft_config("frozen", "model.freeze_audio_encoder=true")
    policy = build_policy(cfg, sft_assets[0])
    trainable = {k for k, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and not any("audio_tower" in k for k in trainable)
    assert any("multi_modal_projector" in k for k in trainable)
    model_group, *side = policy.optimizer.optimizer.param_groups
    assert {id(p) for p in model_group["params"]} == {id(p) for p in policy.model.parameters() if p.requires_grad}
    # the MTP heads the ASR recipes ship train in a group of their own (model/mtp.py)
    assert [{id(p) for p in g["params"]} for g in side] == [{id(p) for p in policy.mtp.parameters()}]


def test_rows_sharing_a_clip_must_share_the_prompt(sft_assets):
    import numpy as np

    from speechrl.rlhf.model.backbone import load_backbone
    from speechrl.rlhf.model.logprobs import token_logprobs

    backbone = load_backbone(sft_assets[0])
    clips = [np.random.default_rng(1).normal(0, 0.1, 16000).astype(np.float32)]
    *_, batch = _grpo_like_batch(backbone, clips, n=3)
    batch.input_ids[2, 1] += 1  # row 2's prompt no longer matches its group's
    with pytest.raises(ValueError, match="row 2 shares clip 0 with row 0 but not its prompt ids"):
        token_logprobs(backbone.model, batch)


def test_freezing_encoder_and_decoder_trains_only_the_projector(sft_config, sft_assets):
    cfg = sft_config("projector-only", "model.freeze_audio_encoder=true", "model.freeze_language_model=true")
    policy = build_policy(cfg, sft_assets[0])
    trainable = {k for k, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all("multi_modal_projector" in k for k in trainable), trainable
    model_group, *side = policy.optimizer.optimizer.param_groups
    assert {id(p) for p in model_group["params"]} == {id(p) for p in policy.model.parameters() if p.requires_grad}
    # the MTP heads the ASR recipes ship train in a group of their own (model/mtp.py)
    assert [{id(p) for p in g["params"]} for g in side] == [{id(p) for p in policy.mtp.parameters()}]


def test_freezing_the_bottom_decoder_layers_stops_the_backward_there(sft_config, sft_assets):
    """model.freeze_decoder_layers=1 (of the test backbone's 2): only layer 1, the final norm and the
    head train; the shared-prompt update's gradients there are the unfrozen model's, and no gradient
    reaches layer 1's input."""
    import numpy as np

    from speechrl.rlhf.model.logprobs import audio_model, token_logprobs

    frozen = build_policy(sft_config("bottom-frozen", "model.freeze_decoder_layers=1"), sft_assets[0])
    whole = build_policy(sft_config("whole"), sft_assets[0])
    trainable = {k for k, p in frozen.model.named_parameters() if p.requires_grad}
    assert trainable and all(".layers.1." in k or ".norm." in k or "lm_head" in k for k in trainable), trainable
    assert any(".layers.1." in k for k in trainable) and any("lm_head" in k for k in trainable)
    rng = np.random.default_rng(0)
    *_, batch = _grpo_like_batch(frozen.backbone, [rng.normal(0, 0.1, 16000).astype(np.float32)], n=3)
    reached = []  # whether layer 0's output (= layer 1's input) carries a gradient
    layer0 = audio_model(frozen.model).language_model.layers[0]
    layer0.register_forward_hook(lambda _m, _i, out: reached.append((out[0] if isinstance(out, tuple) else out).requires_grad))
    grads = []
    for policy in (frozen, whole):
        logp = token_logprobs(policy.model, batch)
        (logp * batch.completion_mask).sum().backward()
        grads.append({k: p.grad for k, p in policy.model.named_parameters() if p.grad is not None})
    assert reached and not any(reached), "layer 1's input carries no gradient: no backward below it"
    assert grads[0].keys() == trainable
    for k in trainable:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-5), k
    with pytest.raises(RecipeError, match=r"model.freeze_decoder_layers.*=3.*2 layers"):
        build_policy(sft_config("too-deep", "model.freeze_decoder_layers=3"), sft_assets[0])


def test_the_reference_above_a_frozen_bottom_takes_the_policys_hidden_states(sft_config, sft_assets, tmp_path):
    """Fed the hidden states the policy's passes took into layer 1, the reference's layers above give
    the full reference's logprobs (shared prompts and full rows); its bottom is the reference's, not a
    copy. Where the policy's bottom is not the reference's, or its passes differ, there is none."""
    import numpy as np

    from speechrl.rlhf.model.logprobs import audio_model, build_token_batch, record_inputs, token_logprobs

    policy = build_policy(sft_config("above", "model.freeze_decoder_layers=1"), sft_assets[0], with_reference=True)
    top = policy.reference_top
    assert top is not None and policy.frozen_layers == 1
    assert len(audio_model(top).language_model.layers) == 1
    assert audio_model(top).language_model.embed_tokens is audio_model(policy.reference).language_model.embed_tokens
    with torch.no_grad():  # the policy's top moves away from the reference's, as training would move it
        for p in audio_model(policy.model).language_model.layers[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    rng = np.random.default_rng(0)
    clips = [rng.normal(0, 0.1, 16000 * s).astype(np.float32) for s in (1, 2)]
    prompts, completions, audios, shared = _grpo_like_batch(policy.backbone, clips, n=3)
    private = build_token_batch(policy.backbone.processor, prompts, completions, [a.copy() for a in audios],
                                policy.backbone.tokenizer.pad_token_id)
    for batch, passes in ((shared, 2), (private, 1)):
        with record_inputs(policy.model, 1) as fed:
            mine = token_logprobs(policy.model, batch)
        assert len(fed) == passes
        with torch.no_grad():
            full = token_logprobs(policy.reference, batch)
            above = token_logprobs(top, batch, feed=fed)
        mask = batch.completion_mask
        assert torch.allclose(above[mask], full[mask], atol=1e-5)
        assert not torch.allclose(mine.detach()[mask], full[mask], atol=1e-3), "the policy's top moved"
    with pytest.raises(ValueError, match="feed: 1 recorded passes"):
        token_logprobs(top, shared, feed=fed)
    checkpointed = build_policy(sft_config("above-ckpt", "model.freeze_decoder_layers=1",
                                           "model.gradient_checkpointing=true"), sft_assets[0], with_reference=True)
    assert checkpointed.reference_top is None, "checkpointing packs the passes: the reference runs in full"
    checkpoint = tmp_path / "step-1"  # a run that trained the bottom too, resumed with it frozen
    with torch.no_grad():
        audio_model(policy.model).language_model.layers[0].mlp.up_proj.weight.add_(0.01)
    save_policy(policy.model, policy.backbone.processor, policy.optimizer, checkpoint, lora=False)
    resumed = build_policy(sft_config("above", "model.freeze_decoder_layers=1"), sft_assets[0], checkpoint,
                           with_reference=True)
    assert resumed.reference_top is None


# --- train.device and train.dtype: one code path for CPU and CUDA, bf16 forwards over fp32 weights ---
def test_auto_is_cpu_and_fp32_without_a_gpu_and_cuda_is_an_error_naming_the_fix():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: auto means cuda here")
    assert train_device("auto").type == "cpu" and compute_dtype("auto", train_device("auto")) == torch.float32
    with pytest.raises(RuntimeError, match=r"train.device=cuda.*train.device=auto"):
        train_device("cuda")
    assert compute_dtype("bf16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("key, value", [("train.dtype", "fp16"), ("train.device", "gpu")])
def test_unknown_device_or_dtype_is_a_recipe_error_naming_the_key(key, value):
    with pytest.raises(RecipeError, match=rf"`{key}` is '{value}'; choose one of"):
        load_recipe("asr/grpo", [f"{key}={value}"])


def test_bf16_forwards_keep_fp32_master_weights_and_agree_with_fp32(sft_config, sft_assets):
    """On CPU too: autocast runs the decoder in bf16; weights, grads and AdamW's state stay fp32,
    and the logprobs (computed in fp32 from bf16 logits) stay close to the fp32 ones."""
    import numpy as np

    from speechrl.rlhf.model.logprobs import token_logprobs

    fp32 = build_policy(sft_config("dtype32", "train.dtype=fp32"), sft_assets[0])
    bf16 = build_policy(sft_config("dtype16", "train.dtype=bf16"), sft_assets[0])
    assert (fp32.dtype, bf16.dtype) == (torch.float32, torch.bfloat16)
    rng = np.random.default_rng(0)
    clips = [rng.normal(0, 0.1, 16000).astype(np.float32) for _ in range(2)]
    *_, batch = _grpo_like_batch(bf16.backbone, clips, n=2)
    mask = batch.completion_mask

    with bf16.autocast():
        logits = bf16.model(input_ids=batch.input_ids[:1, :4]).logits
        logp16 = token_logprobs(bf16.model, batch.to(bf16.device))
    assert logits.dtype == torch.bfloat16 and logp16.dtype == torch.float32
    logp32 = token_logprobs(fp32.model, batch)
    gap = float(((logp16.detach() - logp32).abs() * mask).sum() / mask.sum())
    assert 0 < gap < 0.05, f"bf16 vs fp32 mean |logprob gap| {gap:.4f}"

    (-(logp16 * mask).sum() / mask.sum()).backward()
    bf16.optimizer.step()
    params = [p for p in bf16.model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)
    state = [s for s in bf16.optimizer.optimizer.state.values() if s]
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state)


@pytest.mark.parametrize("layout", ["shared", "private", "packed", "text"])
def test_the_allowed_ids_head_gives_the_full_heads_logprobs_and_grads(sft_assets, monkeypatch, layout):
    """Under a static decoding constraint the trainer computes the LM head over the allowed ids only
    (logprobs.AllowedHead); the logprobs, hidden states and gradients are the full head's, masked."""
    import numpy as np

    from speechrl.rlhf.model import logprobs as lp
    from speechrl.rlhf.model.backbone import load_backbone

    backbone = load_backbone(sft_assets[0])
    model = backbone.model
    rng = np.random.default_rng(1)
    clips = [rng.normal(0, 0.1, 16000 * s).astype(np.float32) for s in (1, 2)]
    prompts, completions, audios, batch = _grpo_like_batch(backbone, clips, n=3)
    if layout == "private":
        batch = lp.build_token_batch(backbone.processor, prompts, completions, [a.copy() for a in audios],
                                     backbone.tokenizer.pad_token_id)
    elif layout == "text":
        batch = lp.build_token_batch(backbone.processor, [p[-12:] for p in prompts], completions,
                                     [None] * len(prompts), backbone.tokenizer.pad_token_id)
        batch.audio_index = None  # every row in full
    elif layout == "packed":
        model.gradient_checkpointing_enable()
    vocab = model.get_output_embeddings().weight.shape[0]
    allowed = lp.vocab_mask(list(range(300)) + [vocab - 1], vocab)
    assert lp.AllowedHead.of(model, allowed) is not None

    def run():
        model.zero_grad()
        logp, hidden = lp.token_logprobs(model, batch, 0.7, allowed, with_hidden=True)
        (logp * batch.completion_mask).sum().backward()
        return logp.detach(), hidden.detach(), {k: p.grad.clone() for k, p in model.named_parameters()
                                                if p.grad is not None}

    fast = run()
    monkeypatch.setattr(lp.AllowedHead, "of", classmethod(lambda cls, model, allowed: None))
    full = run()
    model.gradient_checkpointing_disable()
    mask = batch.completion_mask
    assert torch.allclose(fast[0][mask], full[0][mask], atol=1e-5) and bool((fast[0][mask] < 0).all())
    assert torch.allclose(fast[1][mask], full[1][mask], atol=1e-5)
    assert fast[2].keys() == full[2].keys() and "lm_head.weight" in fast[2]
    for k in full[2]:
        assert torch.allclose(fast[2][k], full[2][k], atol=1e-5), k
    assert bool((fast[2]["lm_head.weight"][300:vocab - 1] == 0).all()), "rows outside the constraint get no gradient"
