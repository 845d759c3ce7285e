"""Asynchronous rollouts end to end (rollout.async, trainers/pipeline.py) through real Ray actors and
real vLLM engines on the tiny backbone: max_staleness 0 is the synchronous run, number for number;
with 1 the next batch is sampled during the update, one version behind, with GRPO on two engines and
with PPO (recipes/asr/ppo.yaml)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from speechrl.rlhf.core.config import load_recipe
from speechrl.rlhf.trainers.online import run_online

pytestmark = [pytest.mark.vllm, pytest.mark.ray]

SMALL = ["data.synthetic.num_utterances=60", "data.max_eval_examples=4",
         "rl.prompts_per_step=4", "rollout.sampling.n=4", "rollout.sampling.max_new_tokens=8",
         "eval_max_new_tokens=8", "rollout.kv_cache_gib=0.25", "train.batch_size=16", "rl.kl_coef=0.05",
         "rollout.num_workers=1", "ray.num_cpus=2", "train.steps=3", "train.eval_every=3",
         "train.checkpoint_every=3", "train.lr=1e-3"]


@pytest.fixture(scope="module")
def base(tiny_overrides, tmp_path_factory, module_ray):
    return [*tiny_overrides, *SMALL, f"run.output_dir={tmp_path_factory.mktemp('async-runs')}"]


def rows(cfg, name):
    return [json.loads(line) for line in (Path(cfg.run.output_dir) / name / "metrics.jsonl").read_text().splitlines()]


def numbers(row):
    return {k: v for k, v in row.items() if not k.startswith(("time/", "async/"))}


def test_max_staleness_0_is_the_synchronous_run_and_1_overlaps_one_version_behind(base):
    sync = load_recipe("asr/grpo", [*base, "run.name=sync"])
    run_online(sync)
    run_online(load_recipe("asr/grpo", [*base, "run.name=async0", "rollout.async.enabled=true",
                                        "rollout.async.max_staleness=0"]))
    straight, pipelined = rows(sync, "sync"), rows(sync, "async0")
    assert [numbers(r) for r in pipelined] == [numbers(r) for r in straight]
    assert [r["async/staleness"] for r in pipelined[1:]] == [0.0, 0.0, 0.0]
    assert all(r["async/generate_s"] > 0 and r["time/wait"] >= 0 for r in pipelined[1:])

    # one version behind, across two engines: every batch after the first was sampled during the
    # previous update
    run_online(load_recipe("asr/grpo", [*base, "run.name=async1", "rollout.async.enabled=true",
                                        "rollout.async.max_staleness=1", "rollout.num_workers=2"]))
    ahead = rows(sync, "async1")
    assert [r["async/staleness"] for r in ahead[1:]] == [0.0, 1.0, 1.0]
    assert [r["async/dropped"] for r in ahead[1:]] == [0.0, 0.0, 0.0]
    assert "eval/wer" in ahead[-1] and (Path(sync.run.output_dir) / "async1" / "final" / "model.safetensors").is_file()


def test_asr_ppo_runs_asynchronously(base):
    """recipes/asr/ppo.yaml (critic and GAE on the WER reward), its next batch sampled during the update."""
    cfg = load_recipe("asr/ppo", [*base, "run.name=ppo1", "rollout.sampling.n=2", "rollout.async.enabled=true",
                                  "rollout.async.max_staleness=1", "train.steps=2", "train.eval_every=2",
                                  "train.checkpoint_every=2"])
    assert cfg.algorithm == "ppo"
    run_online(cfg)
    ran = rows(cfg, "ppo1")
    assert [r["async/staleness"] for r in ran[1:]] == [0.0, 1.0]
    assert all(r["ppo/samples"] > 0 and "ppo/value_mean" in r and r["train/value_loss"] >= 0 for r in ran[1:])
    assert "eval/wer" in ran[-1]


def test_async_with_engines_that_sleep_is_refused_before_training(base, monkeypatch):
    from speechrl.rlhf.core.config import RecipeError
    from speechrl.rlhf.workers.placement import Placement

    # engines sleep only on a GPU shared with the trainer (ray.layout=colocated); on this CPU machine
    # that property is forced, the check that reads it is the real one
    monkeypatch.setattr(Placement, "engines_sleep", property(lambda self: True))
    with pytest.raises(RecipeError, match="ray.layout=separate"):
        run_online(load_recipe("asr/grpo", [*base, "run.name=sleepy", "rollout.async.enabled=true"]))
