"""Fixtures for rollout tests: one tiny backbone per session, synthetic audio, rendered prompts."""
from __future__ import annotations

import numpy as np
import pytest

from speechrl.rollouts.types import RolloutRequest

SR = 16000
TEXTS = ["turn left", "turn right and stop", "go forward ten meters", "move back two steps",
         "stop now", "go to the kitchen", "open the door", "pick up the red cup"]


def synth_clip(k: int, rng: np.random.Generator) -> np.ndarray:
    """A 1-3 s clip: a chirp for even k, band-limited noise bursts for odd k (seeded)."""
    seconds = 1.0 + 2.0 * rng.random()
    t = np.arange(int(seconds * SR)) / SR
    if k % 2 == 0:
        f0, f1 = rng.uniform(150, 400), rng.uniform(800, 3000)
        clip = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds)))
    else:
        noise = np.convolve(rng.standard_normal(t.size), np.ones(8) / 8, mode="same")
        clip = noise * (np.sin(2 * np.pi * rng.uniform(2, 6) * t) > 0)
    return (0.3 * clip / np.abs(clip).max()).astype(np.float32)


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    from speechrl.rlhf.model.backbone import build_tiny_backbone
    from speechrl.rlhf.core.config import TinyBackboneConfig

    return build_tiny_backbone(tmp_path_factory.mktemp("rollouts") / "tiny", TEXTS, TinyBackboneConfig())


@pytest.fixture(scope="session")
def clips() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [synth_clip(k, rng) for k in range(6)]


@pytest.fixture(scope="session")
def make_requests(tiny_backbone_dir, clips):
    """requests(k) -> the first k RolloutRequests (ASR prompt, one clip each, metadata {"id": i})."""
    from speechrl.rlhf.model.prompts import render_prompt
    from speechrl.rlhf.model.backbone import load_backbone

    prompt = render_prompt(load_backbone(tiny_backbone_dir).processor, "asr")

    def requests(k: int) -> list[RolloutRequest]:
        return [RolloutRequest(prompt=prompt, audio=clips[i], sample_rate=SR, metadata={"id": i, "text": TEXTS[i]})
                for i in range(k)]
    return requests


@pytest.fixture(scope="session")
def trainer_greedy():
    """greedy(policy, requests, samples, max_new_tokens) -> the policy worker's own (HF, PEFT or not)
    greedy tokens from each sample's prompt ids, the engine's, with its clip where it has one: what
    an engine holding the policy's weights must decode."""
    import torch

    from speechrl.rlhf.model.logprobs import unwrap

    def greedy(policy, requests, samples, max_new_tokens: int) -> list[list[int]]:
        model = unwrap(policy.model).eval()
        out = []
        for req, s in zip(requests, samples):
            kw = {}
            if req.audio is not None:
                inputs = policy.backbone.processor(text=[req.prompt], audio=[req.audio], sampling_rate=SR,
                                                   return_tensors="pt")
                kw = dict(input_features=inputs["input_features"], feature_attention_mask=inputs["feature_attention_mask"])
            ids = torch.tensor([s.prompt_ids])
            with torch.no_grad():
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, **kw)
            out.append(gen[0, ids.shape[1]:].tolist())
        model.train()
        return out
    return greedy


@pytest.fixture(scope="session")
def make_policy(tiny_backbone_dir):
    """make_policy(*overrides) -> a PolicyWorker (in this process) on the tiny backbone, an asr/grpo
    recipe with a learning rate that moves greedy output in one step."""
    def make(*overrides: str):
        from speechrl.rlhf.core.config import load_recipe
        from speechrl.rlhf.model.backbone import load_backbone
        from speechrl.rlhf.workers.policy_worker import PolicyWorker

        cfg = load_recipe("asr/grpo", [f"model.path={tiny_backbone_dir}", "train.lr=0.02", "train.warmup_steps=0",
                                       "train.batch_size=8", "train.torch_threads=2", *overrides])
        vocab = load_backbone(tiny_backbone_dir).model.get_output_embeddings().weight.shape[0]
        return PolicyWorker(cfg, str(tiny_backbone_dir), allowed_ids=list(range(vocab)))
    return make


@pytest.fixture(scope="session")
def train_step():
    """train_step(engines, policy, requests, seed): one GRPO-style step on the engines' own samples,
    advantages +1 / -1 within each prompt's pair."""
    def step(engines, policy, requests, seed: int) -> None:
        from speechrl.rlhf.algos.batch import sample_batch
        from speechrl.rollouts.engine import generate_across

        samples = generate_across(engines, requests, n=2, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=seed)
        batch = sample_batch(samples, requests, list(range(len(samples))), 1.0,
                             advantages=[1.0 if s.sample_index == 0 else -1.0 for s in samples])
        assert policy.train(batch)["grad_norm"] > 0
    return step
