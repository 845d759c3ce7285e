"""LoRA runs sync the adapter alone: a real PEFT policy trained a step (PolicyWorker, in this process)
and one LoRA-enabled vLLM engine as a Ray worker, reached through the object-store transport.

Order matters: each test continues from the adapter the one before it synced.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from speechrl.rlhf.core.config import RolloutConfig
from speechrl.rlhf.model.backbone import hub_state_dict, load_backbone
from speechrl.rlhf.model.logprobs import unwrap

pytestmark = [pytest.mark.vllm, pytest.mark.ray]
SR = 16000
GREEDY = dict(n=1, temperature=0.0, top_p=1.0, max_new_tokens=12)
# a text prompt over two of the CPU engine's 128-token KV blocks, so the prefix cache keeps it
LONG_PROMPT = " ".join(["turn left, go forward ten meters and pick up the red cup."] * 16)


@pytest.fixture(scope="module")
def worker(tiny_backbone_dir):
    ray = pytest.importorskip("ray")
    from speechrl.rollouts.engine import make_rollout_workers

    # a cluster of its own, even where `ray start` left one that ray.init() would join
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    start = time.perf_counter()
    [handle] = make_rollout_workers(str(tiny_backbone_dir), RolloutConfig(kv_cache_gib=0.25, max_model_len=512),
                                    num_workers=1, seed=0, lora_rank=8)
    print(f"\nLoRA rollout worker up: {time.perf_counter() - start:.1f} s")
    yield handle
    ray.shutdown()


@pytest.fixture(scope="module")
def policy(make_policy):
    """The trainer side of a LoRA run (rank 8 on every decoder projection, fused ones included)."""
    return make_policy("model.lora.enabled=true", "model.lora.r=8", "model.lora.alpha=16")


def generate(worker, requests, **kw):
    from speechrl.rollouts.engine import generate_across

    return generate_across([worker], requests, **kw)


def logprob_gaps(policy, requests, samples, temperature) -> float:
    """max |engine - HF PEFT| sampled-token logprob, the trainer's log_softmax(logits / T)."""
    model = unwrap(policy.model).eval()
    gaps = []
    for s in samples:
        req = requests[s.prompt_index]
        inputs = policy.backbone.processor(text=[req.prompt], audio=[req.audio], sampling_rate=SR, return_tensors="pt")
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([s.prompt_ids + s.completion_ids]),
                           input_features=inputs["input_features"],
                           feature_attention_mask=inputs["feature_attention_mask"]).logits[0]
        pred = logits[len(s.prompt_ids) - 1:-1]
        ours = torch.log_softmax(pred / temperature, -1).gather(1, torch.tensor(s.completion_ids)[:, None])[:, 0]
        gaps.append((ours - torch.tensor(s.logprobs)).abs().max().item())
    model.train()
    return max(gaps)


def engine_adapter(worker) -> dict[str, torch.Tensor]:
    """What reached the engine: the adapter it serves, read back from its directory (same machine)."""
    import ray
    from safetensors.torch import load_file

    path = ray.get(worker.__ray_call__.remote(lambda self: self.lora.lora_path))
    return load_file(str(Path(path) / "adapter_model.safetensors"))


def test_a_training_step_reaches_the_engine_as_the_adapter_alone(worker, policy, make_requests, tiny_backbone_dir,
                                                                 trainer_greedy, train_step):
    from speechrl.rollouts.lora import LoraAdapter
    from speechrl.rollouts.sync import TRANSPORTS

    requests = make_requests(4)
    train_step([worker], policy, requests, seed=1)
    base = [s.completion_ids for s in generate(worker, requests, **GREEDY)]  # no adapter yet: the base model
    adapter = policy.weights()
    assert isinstance(adapter, LoraAdapter)

    start = time.perf_counter()
    TRANSPORTS.get("object_store")().send(adapter, [worker])
    print(f"\nadapter sync ({adapter.nbytes / 2**20:.2f} MiB): {time.perf_counter() - start:.2f} s")
    samples = generate(worker, requests, **GREEDY)
    expected = trainer_greedy(policy, requests, samples, GREEDY["max_new_tokens"])
    assert expected != base, "the training step should change greedy output"
    assert [s.completion_ids for s in samples] == expected

    temperature = 0.7
    sampled = generate(worker, requests, n=3, temperature=temperature, top_p=1.0, max_new_tokens=16, seed=4)
    gap = logprob_gaps(policy, requests, sampled, temperature)
    print(f"max |trainer - vLLM| logprob under LoRA: {gap:.2e}")
    assert gap < 1e-3

    # only adapter tensors crossed, in the hub layout, a small fraction of the model's bytes
    received = engine_adapter(worker)
    model = dict(hub_state_dict(load_backbone(tiny_backbone_dir).model.state_dict().items()))
    assert received.keys() == adapter.tensors.keys()
    assert all(".lora_A." in k or ".lora_B." in k for k in received)
    assert not set(received) & set(model)
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] + ".weight" for k in received}
    assert modules <= set(model), "adapted modules named as the engine's base weights are"
    model_bytes = sum(t.numel() * t.element_size() for t in model.values())
    assert adapter.nbytes == sum(t.numel() * t.element_size() for t in received.values()) < model_bytes / 20


def test_a_second_sync_replaces_the_adapter_with_no_stale_cache(worker, policy, make_requests, trainer_greedy,
                                                                train_step):
    import ray

    from speechrl.rollouts.sync import TRANSPORTS
    from speechrl.rollouts.types import RolloutRequest

    requests = [*make_requests(2), RolloutRequest(prompt=LONG_PROMPT, audio=None, sample_rate=SR)]
    first = generate(worker, requests, **GREEDY)  # the long prompt's KV blocks now cached under adapter v1
    assert len(first[-1].prompt_ids) > 256, "the long prompt should fill two KV blocks"
    assert [s.completion_ids for s in first] == trainer_greedy(policy, requests, first, GREEDY["max_new_tokens"])
    v1 = engine_adapter(worker)

    train_step([worker], policy, make_requests(4), seed=2)
    TRANSPORTS.get("object_store")().send(policy.weights(), [worker])
    samples = generate(worker, requests, **GREEDY)
    expected = trainer_greedy(policy, requests, samples, GREEDY["max_new_tokens"])
    assert expected != [s.completion_ids for s in first], "the second step should change greedy output"
    assert [s.completion_ids for s in samples] == expected
    assert any(not torch.equal(v1[k], t) for k, t in engine_adapter(worker).items())
    # one adapter loaded, one on disk: the last version replaced, not piled up
    loaded, kept = ray.get(worker.__ray_call__.remote(
        lambda self: (self.llm.llm_engine.list_loras(), sorted(p.name for p in self.lora_dir.iterdir()))))
    assert (loaded, kept) == ({2}, ["v2"])


def test_dense_reload_and_constrained_decoding_keep_the_adapter(worker, policy, make_requests, tiny_backbone_dir,
                                                               trainer_greedy):
    """vLLM's reload_weights unloads adapters; the next generate brings the current one back. The
    reply-layout logits processor constrains LoRA requests as it does others."""
    import ray

    from speechrl.rlhf.model.backbone import CODEC_END
    from speechrl.rlhf.model.layout import ReplyLayout

    requests = make_requests(3)
    backbone = load_backbone(tiny_backbone_dir)
    ray.get(worker.load_weights.remote(list(hub_state_dict(backbone.model.state_dict().items()))))
    assert ray.get(worker.__ray_call__.remote(lambda self: self.llm.llm_engine.list_loras())) == set()
    samples = generate(worker, requests, **GREEDY)
    assert [s.completion_ids for s in samples] == trainer_greedy(policy, requests, samples, GREEDY["max_new_tokens"])

    codec = backbone.audio_token_ids()
    layout = ReplyLayout(text_ids=tuple(range(100, 300)), codec_ids=tuple(codec),
                         end_id=backbone.tokenizer.convert_tokens_to_ids(CODEC_END), max_text_tokens=3)
    for s in generate(worker, requests, n=2, temperature=1.0, top_p=1.0, max_new_tokens=10, seed=3,
                      allowed_token_ids=layout):
        for t, token in enumerate(s.completion_ids):
            assert token in layout.allowed(layout.phase(s.completion_ids[:t]))
