"""One in-process vLLM engine shared by the module: token io, logprobs, weight sync
(LoRA's adapter sync: test_lora_sync.py).

Order matters: the weight-sync tests perturb the shared transformers model and then push the
same weights into the engine, so every test after them still sees the two in agreement.
"""
from __future__ import annotations

import time

import pytest
import torch

from speechrl.rlhf.model.backbone import hub_state_dict, load_backbone

pytestmark = pytest.mark.vllm
SR = 16000


@pytest.fixture(scope="module")
def engine(tiny_backbone_dir):
    from speechrl.rollouts.engine import RolloutEngine

    # numba in the process (librosa, the speech rewards' dependency, imports it) used to break
    # vLLM's start-up: see rollouts/vllm_setup.py, guard_vllm_module_scan
    pytest.importorskip("numba")

    start = time.perf_counter()
    eng = RolloutEngine(str(tiny_backbone_dir), kv_cache_gib=0.25, max_model_len=512)
    print(f"\nvLLM engine start: {time.perf_counter() - start:.1f} s")
    yield eng
    del eng


@pytest.fixture(scope="module")
def backbone(tiny_backbone_dir):
    bb = load_backbone(tiny_backbone_dir)
    bb.model.eval()
    return bb


def hf_inputs(backbone, req):
    return backbone.processor(text=[req.prompt], audio=[req.audio], sampling_rate=SR, return_tensors="pt")


def hf_greedy(model, backbone, requests, max_new_tokens=16) -> list[list[int]]:
    out = []
    for req in requests:
        inputs = hf_inputs(backbone, req)
        with torch.no_grad():
            ids = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        out.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    return out


def vllm_greedy(engine, requests, max_new_tokens=16) -> list[list[int]]:
    return [s.completion_ids for s in engine.generate(requests, n=1, temperature=0.0, top_p=1.0,
                                                      max_new_tokens=max_new_tokens)]


def test_token_in_token_out(engine, backbone, make_requests):
    requests = make_requests(3)
    start = time.perf_counter()
    samples = engine.generate(requests, n=4, temperature=1.0, top_p=1.0, max_new_tokens=24, seed=3)
    print(f"\nfirst generate (3 prompts x 4 x <=24 tokens): {time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    again = engine.generate(requests, n=4, temperature=1.0, top_p=1.0, max_new_tokens=24, seed=3)
    print(f"second generate: {time.perf_counter() - start:.2f} s")

    assert [(s.prompt_index, s.sample_index) for s in samples] == [(i, j) for i in range(3) for j in range(4)]
    eos = backbone.eos_token_id
    for s in samples:
        req = requests[s.prompt_index]
        assert s.metadata == req.metadata
        assert 0 < len(s.completion_ids) == len(s.logprobs) <= 24
        assert all(lp <= 0.0 for lp in s.logprobs)
        assert s.finish_reason in {"stop", "length"}
        assert (s.completion_ids[-1] == eos) == (s.finish_reason == "stop")
        assert s.text == backbone.tokenizer.decode(s.completion_ids, skip_special_tokens=True)
        # the trainer reuses vLLM's prompt ids: they must be what the HF processor produces
        assert s.prompt_ids == list(hf_inputs(backbone, req)["input_ids"][0].tolist())
    assert len({tuple(s.completion_ids) for s in samples[:4]}) > 1, "a group's samples should differ"
    assert [s.completion_ids for s in again] == [s.completion_ids for s in samples], "seeded sampling repeats"


def test_an_eager_cpu_engine_compiles_nothing_as_it_samples(engine, make_requests):
    """vLLM wraps the rank count of returned logprobs in torch.compile even in an eager engine; on CPU
    that was a g++ build per engine process and per new batch shape (rollouts/vllm_setup.py,
    eager_helpers_on_cpu). Sampling with logprobs, at two batch shapes, compiles no frame."""
    if torch.cuda.is_available():
        pytest.skip("GPU engines keep vLLM's compiled helpers")
    from torch._dynamo.utils import counters

    before = sum(counters["frames"].values())
    for k in (1, 3):
        samples = engine.generate(make_requests(k), n=2, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=k)
        assert len(samples) == 2 * k and all(all(lp <= 0.0 for lp in s.logprobs) for s in samples)
    assert sum(counters["frames"].values()) == before, dict(counters["frames"])


def test_sampling_logprobs_match_trainer_recompute(engine, backbone, make_requests):
    """vLLM's processed logprobs == log_softmax(logits / T) of a transformers forward pass."""
    temperature = 0.7
    requests = make_requests(3)
    samples = engine.generate(requests, n=4, temperature=temperature, top_p=1.0, max_new_tokens=24, seed=5)
    gaps, raw_gaps = [], []
    for s in samples:
        inputs = hf_inputs(backbone, requests[s.prompt_index])
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        with torch.no_grad():
            logits = backbone.model(input_ids=ids, input_features=inputs["input_features"],
                                    feature_attention_mask=inputs["feature_attention_mask"]).logits[0]
        # logits at position t predict token t+1: the completion's predictors start one before it
        pred = logits[len(s.prompt_ids) - 1:-1]
        target = torch.tensor(s.completion_ids).unsqueeze(1)
        ours = torch.log_softmax(pred / temperature, -1).gather(1, target).squeeze(1)
        raw = torch.log_softmax(pred, -1).gather(1, target).squeeze(1)
        theirs = torch.tensor(s.logprobs)
        gaps.append((ours - theirs).abs().max().item())
        raw_gaps.append((raw - theirs).abs().max().item())
    print(f"\nmax |trainer - vLLM| logprob: {max(gaps):.2e} (vs untempered: {max(raw_gaps):.2e})")
    assert max(gaps) < 1e-3
    assert max(raw_gaps) > 1e-2, "the test should tell tempered from raw logprobs"


def test_weight_sync_makes_greedy_match(engine, backbone, make_requests):
    requests = make_requests(3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in backbone.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    expected = hf_greedy(backbone.model, backbone, requests)
    assert vllm_greedy(engine, requests) != expected, "perturbed weights should change greedy output"

    start = time.perf_counter()
    engine.load_weights(hub_state_dict(backbone.model.state_dict().items()))
    print(f"\nload_weights (full model): {time.perf_counter() - start:.2f} s")
    assert vllm_greedy(engine, requests) == expected
