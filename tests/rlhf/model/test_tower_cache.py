"""A frozen audio tower's outputs are cached per clip (rlhf/model/tower_cache.py): the same numbers
as transformers' own forward, computed once, and never served once the tower can change."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from speechrl.rlhf.model.tower_cache import TowerCache, cacheable, tower_cache


@pytest.fixture()
def frozen(sft_assets):
    from speechrl.rlhf.model.backbone import load_backbone
    from speechrl.rlhf.model.logprobs import audio_model, build_token_batch, prompt_ids_for
    from speechrl.rlhf.model.prompts import render_prompt
    from speechrl.rlhf.model.policy import freeze_audio_encoder

    backbone = load_backbone(sft_assets[0])
    freeze_audio_encoder(backbone.model)
    backbone.model.train()
    proc = backbone.processor
    rng = np.random.default_rng(0)
    clips = [rng.normal(0, 0.1, int(16000 * s)).astype(np.float32) for s in (0.7, 1.3, 2.0)]
    prompt = render_prompt(proc, "asr")
    batch = build_token_batch(proc, [prompt_ids_for(proc, prompt, c) for c in clips], [[5, 6, 7]] * 3, clips,
                              backbone.tokenizer.pad_token_id)
    return backbone.model, batch, audio_model(backbone.model).audio_tower


def _transformers_logprobs(model, batch):
    """log p of the completion tokens from Qwen2AudioForConditionalGeneration's own forward."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, input_features=batch.input_features,
                   feature_attention_mask=batch.feature_attention_mask).logits[:, :-1].float()
    logp = logits.log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    return logp[batch.completion_mask]


def test_frozen_tower_is_encoded_once_per_clip_with_transformers_numbers(frozen):
    from speechrl.rlhf.model.logprobs import token_logprobs

    model, batch, tower = frozen
    assert cacheable(tower)
    cache = tower_cache(tower)
    first = token_logprobs(model, batch)[batch.completion_mask]
    assert (cache.misses, cache.hits, len(cache.entries)) == (3, 0, 3)
    second = token_logprobs(model, batch)[batch.completion_mask]
    assert (cache.misses, cache.hits) == (3, 3), "the second pass reads every clip from the cache"
    assert torch.equal(first, second)
    assert torch.allclose(first, _transformers_logprobs(model, batch), atol=1e-5)
    # the projector still trains through cached outputs
    model.zero_grad()
    token_logprobs(model, batch)[batch.completion_mask].sum().backward()
    grads = {k for k, p in model.named_parameters() if p.grad is not None}
    assert any("multi_modal_projector" in k for k in grads) and not any("audio_tower" in k for k in grads)


def test_a_changed_tower_weight_empties_the_cache(frozen):
    from speechrl.rlhf.model.logprobs import token_logprobs

    model, batch, tower = frozen
    before = token_logprobs(model, batch)[batch.completion_mask]
    with torch.no_grad():  # what loading a checkpoint or a weight sync into the tower does
        next(tower.parameters()).mul_(1.5)
    after = token_logprobs(model, batch)[batch.completion_mask]
    assert tower_cache(tower).misses == 6, "every clip is encoded again with the new weights"
    assert not torch.allclose(before, after)
    assert torch.allclose(after, _transformers_logprobs(model, batch), atol=1e-5)


def test_a_trainable_or_random_tower_is_never_cached(frozen):
    model, batch, tower = frozen
    tower.config.dropout = 0.1
    assert not cacheable(tower), "dropout in training mode: the output is not a function of the clip"
    tower.eval()
    assert cacheable(tower)
    tower.config.dropout = 0.0
    tower.train()
    next(tower.parameters()).requires_grad_(True)
    assert not cacheable(tower)


def test_the_cache_keeps_to_its_byte_budget_least_recently_used_first():
    tower = torch.nn.Linear(2, 2).requires_grad_(False)
    cache = TowerCache(max_bytes=2 * 4 * 4 * 4)  # two [4, 4] float32 entries
    feats = [torch.full((1, 3), float(i)) for i in range(3)]

    def get(i):
        return cache.outputs(tower, feats[i], torch.tensor([4]), lambda rows: torch.full((len(rows), 5, 4), float(i)))[0]

    get(0), get(1), get(0), get(2)  # 1 is the least recently used when 2 arrives
    assert len(cache.entries) == 2 and cache.bytes == 2 * 4 * 4 * 4
    assert torch.equal(get(0), torch.zeros(4, 4)) and cache.misses == 3
    get(1)
    assert cache.misses == 4, "the evicted entry is computed again"


def test_silent_clips_of_different_lengths_are_different_entries(sft_assets):
    """Silent clips pad to the same features whatever their length (a duplex dialogue's first chunks);
    each must still get its own number of frames, or a batch holding both cannot be filled."""
    from speechrl.rlhf.model.backbone import load_backbone
    from speechrl.rlhf.model.logprobs import audio_model, build_token_batch, prompt_ids_for, token_logprobs
    from speechrl.rlhf.model.policy import freeze_audio_encoder
    from speechrl.rlhf.model.prompts import render_prompt

    backbone = load_backbone(sft_assets[0])
    freeze_audio_encoder(backbone.model)
    proc = backbone.processor
    clips = [np.zeros(int(16000 * s), dtype=np.float32) for s in (0.16, 0.32, 0.64)]
    prompt = render_prompt(proc, "asr")
    prompts = [prompt_ids_for(proc, prompt, c) for c in clips]
    assert len({len(p) for p in prompts}) == 3, "each length has its own number of placeholders"
    batch = build_token_batch(proc, prompts, [[5, 6, 7]] * 3, clips, backbone.tokenizer.pad_token_id)
    logp = token_logprobs(backbone.model, batch)[batch.completion_mask]
    assert torch.isfinite(logp).all()
    assert len(tower_cache(audio_model(backbone.model).audio_tower).entries) == 3
