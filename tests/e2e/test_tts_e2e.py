"""TTS GRPO, PPO and online DPO end to end through real Ray actors and a real vLLM engine, tiny backbone.

The engine samples only codec tokens after a text-only prompt and stops at `<|codec_end|>`; the
reward worker decodes the codec ids to audio; held-out samples are written at every evaluation;
online DPO writes each round's pairs in the preference format, which read back and encode.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from speechrl.rlhf.core.config import load_recipe

pytestmark = [pytest.mark.vllm, pytest.mark.ray]

RL = ["rl.prompts_per_step=4", "rollout.sampling.n=4", "rollout.sampling.max_new_tokens=24",
      "rollout.kv_cache_gib=0.25", "train.batch_size=16", "rollout.num_workers=1", "ray.num_cpus=2",
      "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def base(tts_overrides, tmp_path_factory, module_ray):
    return [*tts_overrides, *RL, f"run.output_dir={tmp_path_factory.mktemp('tts-rl-runs')}"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tts_grpo_samples_codec_tokens_scores_decoded_audio_and_writes_samples(base):
    from speechrl.rlhf.trainers.online import OnlineRecipe

    recipe = OnlineRecipe(load_recipe("tts/grpo", [*base, "run.name=grpo"]))
    try:
        recipe.setup()
        requests, samples = recipe.mode.rollout(0, recipe.generate)
        assert all(r.audio is None for r in requests)
        held = {ex.text for ex, _ in recipe.mode.eval_set.items}
        pool = recipe.mode.prompt_pool
        assert pool and not held & {ex.text for ex in pool}  # shipped: "grammar"
        allowed, end = set(recipe.task.allowed_ids), recipe.task.tokens.end_id
        assert all(set(s.completion_ids) <= allowed for s in samples)
        for s in samples:  # the stop token is kept and ends the completion; otherwise the cap was hit
            assert (s.completion_ids[-1] == end) == (s.finish_reason == "stop")
            assert end not in s.completion_ids[:-1] and len(s.completion_ids) <= 24
        scores = recipe.score(samples, requests)
        decodable = [bool(recipe.task.codec_ids(s.completion_ids)) for s in samples]
        assert list(scores.valid) == decodable  # a completion with no audio tokens goes unscored
        summary = recipe.train()
        # eval_draws: same (the default): evaluating the final weights again draws what the run's last
        # evaluation drew, so the run's logged changes are the weights' alone; per_step draws afresh
        run = Path(summary["run"])
        scores = run / "samples" / "step-2" / "scores.jsonl"
        logged_scores = scores.read_text()
        last = [r for r in rows(run) if "eval/speech_sanity/reward" in r][-1]
        again = recipe.evaluate(2)
        assert "eval/speech_sanity/reward" in again
        assert {k: again[k] for k in again if k in last} == {k: last[k] for k in again if k in last}
        assert scores.read_text() == logged_scores
        recipe.cfg.eval_draws = "per_step"
        recipe.evaluate(2)
        assert scores.read_text() != logged_scores
    finally:
        recipe.cleanup()
    logged = rows(run)
    assert [r["step"] for r in logged if "eval/speech_sanity/reward" in r] == [0, 2]
    assert all("rewards/speech_sanity/reward" in r for r in logged if r["step"] > 0)
    assert len(list((run / "samples" / "step-2").glob("*.wav"))) == 2
    assert summary["logprob gap vLLM/trainer"] < 1e-3


def test_tts_online_dpo_forms_pairs_from_ranked_samples_and_saves_them(base):
    from speechrl.data.preferences import encode_pairs, read_preferences
    from speechrl.rlhf.trainers.online import run_online
    from speechrl.rollouts.codec import CodecSpec

    # on two trainer ranks: the preference step's micro-batches of pairs split between them
    cfg = load_recipe("tts/online_dpo", [*base, "run.name=odpo", "dpo.min_reward_gap=0", "tts.prompt_texts=grammar",
                                         "train.num_ranks=2", "ray.num_cpus=3"])
    summary = run_online(cfg)
    run = Path(summary["run"])
    trained = [r for r in rows(run) if "train/pairs" in r]
    assert len(trained) == 2 and all(r["train/pairs"] >= 0 for r in trained)
    files = sorted((run / "pairs").glob("round-*.jsonl"))
    assert files, "no round formed a pair"
    pairs = read_preferences(files[0], on_bad="fail")
    assert pairs and all(p.annotator == "rewards:speech_sanity" for p in pairs)
    encoded = encode_pairs(pairs, CodecSpec.from_recipe(cfg).build(), on_bad="fail")
    assert all(len(e.chosen) and len(e.rejected) for e in encoded)
    if any(r["train/pairs"] for r in trained):
        assert any("train/reward_accuracy" in r for r in trained)


def test_tts_ppo_trains_a_critic_on_the_speech_rewards(base):
    """recipes/tts/ppo.yaml: two steps, the value head trained beside the policy on decoded-audio rewards."""
    from speechrl.rlhf.trainers.online import run_online

    cfg = load_recipe("tts/ppo", [*base, "run.name=ppo", "rollout.sampling.n=2"])
    assert cfg.algorithm == "ppo"
    run_online(cfg)
    logged = [r for r in rows(Path(cfg.run.output_dir) / "ppo") if "time/step" in r]
    assert len(logged) == 2
    assert all(r["ppo/samples"] > 0 and r["train/value_loss"] >= 0 and "ppo/reply_kl" in r for r in logged)
    assert (Path(cfg.run.output_dir) / "ppo" / "final" / "model.safetensors").is_file()
