"""Verified multi-token decoding in a real vLLM engine: MTP heads saved by model/mtp.py draft through
vLLM's Medusa proposer; greedy output is plain decoding's, sampling is the policy's own distribution,
and a weight sync reaches the drafter."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from speechrl.rlhf.model.backbone import load_backbone
from speechrl.rlhf.model.mtp import MTP_PREFIX, MtpHeads, acceptance

pytestmark = pytest.mark.vllm
SR = 16000
K = 3


def _greedy_rows(backbone, requests, max_new_tokens=16):
    """HF greedy completions of `requests` and their token batch (prompt + completion ids)."""
    from speechrl.rlhf.model.logprobs import build_token_batch, prompt_ids_for

    prompts, completions = [], []
    for req in requests:
        inputs = backbone.processor(text=[req.prompt], audio=[req.audio], sampling_rate=SR, return_tensors="pt")
        with torch.no_grad():
            ids = backbone.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        prompts.append(prompt_ids_for(backbone.processor, req.prompt, req.audio))
        completions.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    batch = build_token_batch(backbone.processor, prompts, completions, [r.audio for r in requests],
                              backbone.tokenizer.pad_token_id)
    return completions, batch


def _own_completions(source, path, requests):
    """A copy of the backbone at `source` in `path`: (backbone, its greedy completions of `requests`,
    their token batch, its last hidden states on that batch)."""
    from speechrl.rlhf.model.logprobs import token_logprobs

    shutil.copytree(source, path)
    backbone = load_backbone(path)
    backbone.model.eval()
    completions, batch = _greedy_rows(backbone, requests)
    with torch.no_grad():
        _, hidden = token_logprobs(backbone.model, batch, with_hidden=True)
    return backbone, completions, batch, hidden


def _fit(heads: MtpHeads, hidden: torch.Tensor, batch, steps: int = 150) -> tuple[float, float]:
    """Adam on the heads' trainable weights against a batch's completions: (first loss, last loss)."""
    opt = torch.optim.Adam([p for p in heads.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss, _ = heads.loss(hidden, batch.input_ids, batch.completion_mask)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses[0], losses[-1]


@pytest.fixture(scope="module")
def mtp_backbone(tiny_backbone_dir, make_requests, tmp_path_factory):
    """The tiny backbone with K heads distilled on its own greedy completions of the test prompts (so
    their drafts are mostly right there), and those completions."""
    path = tmp_path_factory.mktemp("mtp") / "backbone"
    backbone, completions, batch, hidden = _own_completions(tiny_backbone_dir, path, make_requests(4))
    heads = MtpHeads.like(backbone.model.get_output_embeddings(), K)
    first, last = _fit(heads, hidden, batch)
    assert last < 0.2 * first, "the heads fit their targets"
    heads.save(path)
    return path, completions, heads


@pytest.fixture(scope="module")
def engine(mtp_backbone):
    from speechrl.rollouts.engine import RolloutEngine

    eng = RolloutEngine(str(mtp_backbone[0]), kv_cache_gib=0.25, max_model_len=512, mtp_tokens=K)
    yield eng
    del eng


def _delta(before: dict, after: dict) -> dict:
    return acceptance(after["drafts"] - before["drafts"],
                      [a - b for a, b in zip(after["accepted_per_position"], before["accepted_per_position"])])


def _greedy(engine, requests):
    return [s.completion_ids for s in engine.generate(requests, n=1, temperature=0.0, top_p=1.0, max_new_tokens=16)]


def test_greedy_output_is_plain_decodings_with_drafts_kept(engine, mtp_backbone, make_requests):
    _, expected, _ = mtp_backbone
    before = engine.spec_stats()
    assert _greedy(engine, make_requests(4)) == expected
    stats = _delta(before, engine.spec_stats())
    assert stats["drafts"] > 0
    # heads fit to these very completions: most drafts are kept, several tokens a step
    assert stats["mean_emitted"] > 2.0, stats
    assert abs(sum(stats["histogram"]) - 1) < 1e-9 and len(stats["histogram"]) == K + 1


def test_more_drafts_than_saved_heads_is_an_error_naming_both(mtp_backbone):
    from speechrl.rollouts.engine import RolloutEngine

    with pytest.raises(ValueError, match=f"{K} MTP heads, fewer than rollout.mtp_tokens={K + 2}.*at most {K}"):
        RolloutEngine(str(mtp_backbone[0]), kv_cache_gib=0.25, max_model_len=512, mtp_tokens=K + 2)


def test_a_weight_sync_reaches_the_drafter(engine, mtp_backbone, make_requests):
    """New heads in the sync (their `mtp.` names) replace the drafter's: zero heads draft token 0 every
    time, which these completions rarely hold, so acceptance falls; the output stays plain greedy."""
    from speechrl.rlhf.model.backbone import hub_state_dict

    path, expected, heads = mtp_backbone
    policy = list(hub_state_dict(load_backbone(path).model.state_dict().items()))
    zero = {k: torch.zeros_like(v) for k, v in heads.state_dict().items()}
    engine.load_weights([*policy, *((f"{MTP_PREFIX}{k}", v) for k, v in zero.items())])
    before = engine.spec_stats()
    assert _greedy(engine, make_requests(4)) == expected
    stats = _delta(before, engine.spec_stats())
    assert stats["mean_emitted"] < 1.5, stats


@pytest.mark.xfail(not torch.cuda.is_available(), strict=True,
                   reason="vLLM 0.32's CPU spec-decode sampling keeps drafts far too often (docs/mtp.md); "
                          "strict: when a vLLM release fixes it this test passes and tells us")
def test_sampling_follows_the_policys_own_distribution(engine, mtp_backbone, make_requests):
    """Speculative rejection keeps the sampled distribution the policy's: with zero heads every draft
    is token 0, kept with probability p(0) and otherwise resampled. Over 6 allowed tokens, the
    empirical joint of the first two tokens matches the exact one from a transformers forward pass.
    (The engine refuses to sample with drafts on CPU; the test calls vLLM's generate past that guard.)"""
    from scipy.stats import chisquare

    from speechrl.rlhf.model.logprobs import prompt_ids_for

    path, _, _ = mtp_backbone  # the previous test left zero heads in the engine; make sure here too
    heads = MtpHeads(K, *reversed(load_backbone(path).model.get_output_embeddings().weight.shape))
    engine.load_weights([(f"{MTP_PREFIX}{k}", torch.zeros_like(v)) for k, v in heads.state_dict().items()])
    allowed = [0, 40, 41, 42, 43, 44]
    req = make_requests(1)[0]
    before = engine.spec_stats()
    samples = engine.generate([req] * 4, n=750, temperature=1.0, top_p=1.0, max_new_tokens=2,
                              allowed_token_ids=allowed, engine_seed=7, unverified_sampling=True)
    stats = _delta(before, engine.spec_stats())
    assert stats["drafts"] > 0 and 0 < stats["histogram"][0] < 1, "drafts were both kept and rejected"
    counts = np.zeros((6, 6))
    for s in samples:
        counts[allowed.index(s.completion_ids[0]), allowed.index(s.completion_ids[1])] += 1

    backbone = load_backbone(path)
    backbone.model.eval()
    prompt = prompt_ids_for(backbone.processor, req.prompt, req.audio)
    feats = backbone.processor(text=[req.prompt], audio=[req.audio], sampling_rate=SR, return_tensors="pt")
    mask = torch.full((backbone.model.get_output_embeddings().weight.shape[0],), float("-inf"))
    mask[allowed] = 0
    with torch.no_grad():
        rows = torch.tensor([prompt + [a] for a in allowed])
        out = backbone.model(input_ids=rows, attention_mask=torch.ones_like(rows),
                             input_features=feats["input_features"].expand(6, -1, -1),
                             feature_attention_mask=feats["feature_attention_mask"].expand(6, -1))
        first = torch.softmax(out.logits[0, -2] + mask, -1)[allowed]
        second = torch.softmax(out.logits[:, -1] + mask, -1)[:, allowed]
    exact = (first[:, None] * second).double().numpy()
    exact /= exact.sum()  # float32 sums to 1 only within its rounding
    total = counts.sum()
    assert total == 3000
    _, p_value = chisquare(counts.ravel(), exact.ravel() * total)
    assert p_value > 1e-3, (counts, exact * total)










def test_heads_under_one_shared_lm_head_draft_in_vllm(tiny_backbone_dir, make_requests, tmp_path):
    """`model.mtp.shared_lm_head` (vLLM Medusa's original_lm_head): the blocks alone fit the policy's
    greedy completions under one frozen copy of its LM head, saved once; vLLM drafts with them and the
    greedy output stays plain decoding's."""
    from safetensors.torch import load_file

    from speechrl.rollouts.engine import RolloutEngine

    path = tmp_path / "backbone"
    backbone, completions, batch, hidden = _own_completions(tiny_backbone_dir, path, make_requests(4))
    lm_head = backbone.model.get_output_embeddings()
    heads = MtpHeads.like(lm_head, K, shared_lm_head=True).requires_grad_(True)
    assert [n for n, p in heads.named_parameters() if p.requires_grad] == [f"blocks.{i}.layers.0.weight" for i in range(K)]
    first, last = _fit(heads, hidden, batch)
    assert last < 0.5 * first, "the blocks learn to read the shared head"
    assert torch.equal(heads.lm_head.weight, lm_head.weight), "the shared head stays the policy's"
    heads.save(path)
    saved = load_file(str(path / "mtp" / "model.safetensors"))
    assert sorted(saved) == sorted([*(f"blocks.{i}.layers.0.weight" for i in range(K)), "lm_head.weight"])
    eng = RolloutEngine(str(path), kv_cache_gib=0.25, max_model_len=512, mtp_tokens=K)
    try:
        before = eng.spec_stats()
        assert _greedy(eng, make_requests(4)) == completions
        stats = _delta(before, eng.spec_stats())
        assert stats["drafts"] > 0 and stats["mean_emitted"] > 1.5, stats
    finally:
        del eng
