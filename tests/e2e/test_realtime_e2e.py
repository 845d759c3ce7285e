"""Realtime PPO end to end through real Ray actors, a real vLLM engine and the tiny judge.

Two PPO steps on the small backbone, on two trainer ranks: multi-turn episodes sampled under the reply layout (text,
then codec tokens), scored by the recipe's rewards with the tiny persona judge in a reward worker
of its own (its vLLM engine there), values and GAE, the update, weight sync; drift evaluated before
and after, the plot written; checkpoints carry the value head and the KL controller, and the
coefficient a step used is the one the previous checkpoint saved. The tiny judge has learned
nothing: this checks plumbing, not taste.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from speechrl.rlhf.core.config import load_recipe

pytestmark = [pytest.mark.vllm, pytest.mark.ray]

RL = ["rl.prompts_per_step=2", "rollout.sampling.max_new_tokens=48", "eval_max_new_tokens=48",
      "rollout.kv_cache_gib=0.25", "rollout.num_workers=1", "ray.num_cpus=3", "train.steps=2", "train.eval_every=2",
      "train.checkpoint_every=1", "ppo.kl_horizon=100", "realtime.max_text_tokens=16"]


@pytest.fixture(scope="module")
def base(realtime_overrides, tmp_path_factory, module_ray):
    return [*realtime_overrides, *RL, f"run.output_dir={tmp_path_factory.mktemp('realtime-rl-runs')}"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ppo_run(base):
    from speechrl.rlhf.trainers.online import run_online

    # on two trainer ranks (FSDP2): the reply layout's mask, the critic and the packed shared prompts
    # sharded; the single-rank path is the in-process tests' (tests/rlhf/modes/test_realtime.py)
    cfg = load_recipe("realtime/ppo", [*base, "run.name=ppo", "train.num_ranks=2", "ray.num_cpus=4"])
    return cfg, run_online(cfg)


def test_realtime_ppo_runs_end_to_end_and_writes_drift_curves(ppo_run):
    from speechrl.rlhf.algos.updates import KL_STATE

    cfg, summary = ppo_run
    run = Path(summary["run"])
    logged = rows(run)
    assert [r["step"] for r in logged] == [0, 1, 2]
    for r in logged[1:]:
        assert 0.0 <= r["rewards/persona_judge/reward"] <= 1.0  # a probability-weighted rating, mapped to [0, 1]
        assert r["rewards/latency/ttfa_tokens"] >= 0 and r["rewards/reply_length/words"] >= 0
        assert r["ppo/samples"] > 0 and r["train/value_loss"] >= 0 and "train/clip_fraction" in r
        assert r["train/logprob_gap"] < 1e-3, "vLLM's layout processor and the trainer's masks must agree"
    # the beta step 2 used is the adaptive controller's state saved with the step-1 checkpoint
    saved = json.loads((run / "checkpoints" / "step-1" / KL_STATE).read_text())["kl_coef"]
    assert logged[2]["ppo/kl_coef"] == pytest.approx(saved) and saved != cfg.rl.kl_coef
    assert (run / "checkpoints" / "step-2" / "value_head.pt").is_file()

    drift = [r for r in logged if "drift/judge" in r]
    assert [r["step"] for r in drift] == [0, 2]
    turns = cfg.realtime.drift_turns
    for r in drift:
        assert 0.0 <= r["drift/ooc_rate"] <= 1.0 and all(f"drift/judge/turn_{k}" in r for k in range(1, turns + 1))
        # the rule check beside the judge (realtime.drift_check), by turn too
        assert 0.0 <= r["drift/check"] <= 1.0 and all(f"drift/check/turn_{k}" in r for k in range(1, turns + 1))
    curves = json.loads((run / "drift" / "step-00002.json").read_text())
    assert curves["turn"] == list(range(1, turns + 1)) and len(curves["replies"]) == 4 * turns  # 4 personas
    assert len(curves["check"]) == turns and all("check" in reply for reply in curves["replies"])
    assert Path(summary["drift plot"]).stat().st_size > 1000
    # per-dialogue scores for paired intervals: one id a dialogue, the mean of its turns' scores
    from speechrl.rlhf.core.intervals import example_table
    from speechrl.rlhf.modes import get_mode

    files = get_mode(cfg).example_scores(run)
    assert sorted(files) == [0, 2]
    last = example_table(files[2])
    assert len(last["drift/judge"]) == 4 and set(last) == {"drift/judge", "drift/check"}
    for key in ("judge", "check"):
        by_dialogue = {}
        for reply in curves["replies"]:
            if reply[key] is not None:
                by_dialogue.setdefault(reply["id"].rsplit("/t", 1)[0], []).append(reply[key])
        assert last[f"drift/{key}"] == pytest.approx({d: sum(v) / len(v) for d, v in by_dialogue.items()})
    assert "drift judge score before" in summary and "drift out-of-character rate after" in summary
    assert "drift check before" in summary and "drift check after" in summary
    # the summary's total is ~0 (z-normalized rewards); each reward's raw mean is there too
    assert 0.0 <= summary["mean persona_judge (last step)"] <= 1.0


def test_eval_of_the_final_checkpoint_replays_the_runs_last_drift_evaluation(ppo_run, base, capsys):
    """`speechrl eval <final> --recipe realtime/ppo`: engines serving the saved weights, no trainer.
    Greedy decoding of the same dialogues from the same weights, scored by the same judge, gives
    the replies and curves the run logged at its last evaluation."""
    from speechrl.rlhf.cli.main import main

    cfg, summary = ppo_run
    final = Path(summary["final weights"])
    assert main(["eval", str(final), "--recipe", "realtime/ppo", *base]) == 0
    out = capsys.readouterr().out
    assert "out-of-character" in out and f"judge: {cfg.realtime.drift_judge}" in out
    evaluated = json.loads((final / "eval" / "drift" / "step-00000.json").read_text())
    logged = json.loads((Path(summary["run"]) / "drift" / f"step-{cfg.train.steps:05d}.json").read_text())
    assert [r["reply"] for r in evaluated["replies"]] == [r["reply"] for r in logged["replies"]]
    assert evaluated["turn"] == logged["turn"] and evaluated["scored"] == logged["scored"]
    assert evaluated["judge"] == pytest.approx(logged["judge"], abs=1e-4)
    assert (final / "eval" / "drift.png").stat().st_size > 1000


def test_a_ppo_run_resumed_from_its_step_1_checkpoint_logs_what_the_run_did(ppo_run, tmp_path):
    """Exact resume with a critic, the adaptive KL controller and multi-turn episodes: the engines
    are reseeded per generate call from (seed, step, call), so a copy of the run cut back to its
    step-1 checkpoint and resumed logs at step 2 exactly what the uninterrupted run logged."""
    import shutil

    from speechrl.rlhf.trainers.online import run_online

    cfg, summary = ppo_run
    run = Path(summary["run"])
    copy = tmp_path / run.name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("step-2", "final"))
    run_online(cfg, resume=str(copy))
    # timings differ, and so does the judge cache's hit rate: the resumed step finds the judgments the
    # first run cached for the same replies (the scores themselves must be equal)
    numbers = lambda row: {k: v for k, v in row.items()  # noqa: E731
                           if not k.startswith("time/") and not k.endswith("/cache_hit")}
    assert [r["step"] for r in rows(copy)] == [0, 1, 2]
    assert [numbers(r) for r in rows(copy)] == [numbers(r) for r in rows(run)]
