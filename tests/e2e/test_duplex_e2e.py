"""Duplex SFT then GRPO end to end: real espeak-ng dialogues on the 160 ms clock, a real vLLM engine
sampling chunks under the chunk layout, the turn-taking reward in a Ray reward worker, the update and
weight sync, held-out dialogues played greedily before and after, and the demo's report from them.
Two steps each on the small backbone: this checks the plumbing, not what is learnt (README, Duplex)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from speechrl.rlhf.core.config import load_recipe

pytestmark = [pytest.mark.vllm, pytest.mark.ray]


@pytest.fixture(scope="module")
def runs(duplex_overrides, tmp_path_factory, module_ray):
    from speechrl.rlhf.trainers.online import run_online
    from speechrl.rlhf.trainers.sft import run_sft

    # two kinds (a pause, a tool call) and a shorter action channel keep the untrained policy's chunks
    # short: each chunk of each dialogue is one generate call, and the other kinds are unit-tested
    base = [*duplex_overrides, f"run.output_dir={tmp_path_factory.mktemp('duplex-e2e')}", "duplex.kinds=[pause,tool]",
            "duplex.max_action_tokens=12", "rollout.sampling.max_new_tokens=18", "eval_max_new_tokens=18"]
    sft = run_sft(load_recipe("duplex/sft", [*base, "run.name=sft", "train.steps=2", "train.eval_every=2"]))
    cfg = load_recipe("duplex/grpo", [*base, "run.name=grpo", f"run.init_from={sft['final weights']}",
                                      "train.steps=2", "train.eval_every=2", "rl.prompts_per_step=2",
                                      "rollout.sampling.n=2", "rollout.kv_cache_gib=0.25", "ray.num_cpus=3"])
    return sft, cfg, run_online(cfg)


def test_grpo_plays_chunks_scores_each_axis_and_evaluates_on_the_clock(runs):
    sft, cfg, rl = runs
    run = Path(rl["run"])
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "rewards/total" in r]
    assert len(steps) == 2
    for r in steps:
        for component in ("response", "pause", "backchannel", "interrupt", "tool"):
            assert -1.0 <= r[f"rewards/duplex_turn_taking/{component}"] <= 0.0
        assert r["train/logprob_gap"] < 1e-3, "vLLM's chunk layout and the trainer's masks must agree"
    evaluations = sorted((run / "duplex").glob("step-*.json"))
    assert [p.name for p in evaluations] == ["step-00000.json", "step-00002.json"]
    played = json.loads(evaluations[-1].read_text())
    assert {d["kind"] for d in played["dialogues"]} == set(cfg.duplex.kinds)
    for d in played["dialogues"]:
        assert len(d["played"]) == len(d["labels"]) and set(d["played"]) <= set(".SA")
    assert 0.0 <= played["metrics"]["duplex/pause_takeover"] <= 1.0
    assert "pause take-over rate before" in rl and "held-out chunk loss after" in sft


def test_demo_report_tabulates_every_target_after_sft_and_after_grpo(runs, capsys):
    from speechrl.rlhf.modes import get_mode

    sft, cfg, rl = runs
    result = get_mode(cfg).demo_report(sft, rl, 1.0)
    out = capsys.readouterr().out
    for label in ("pause take-over rate", "backchannel take-over rate", "interruptions stopped within 2 chunks",
                  "response latency, median chunks", "tool-call exact match"):
        assert label in out
    first = json.loads((Path(rl["run"]) / "duplex" / "step-00000.json").read_text())["metrics"]
    assert result["duplex/tool_exact sft"] == first["duplex/tool_exact"]
