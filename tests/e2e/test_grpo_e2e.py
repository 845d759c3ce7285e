"""GRPO end to end through real Ray actors and a real vLLM engine, on a tiny backbone.

Covers: a run that checkpoints, is interrupted, and resumes with the step count continuing and the
same numbers as an uninterrupted run;
rollout, reward and policy workers killed mid-run (replaced and the step retried, or a clear stop
naming the checkpoint to resume from); per-phase timers; a LoRA run syncing its adapter alone.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from speechrl.rlhf.core.config import load_recipe
from speechrl.rlhf.trainers.online import OnlineRecipe, run_online

pytestmark = [pytest.mark.vllm, pytest.mark.ray]

SMALL = ["data.synthetic.num_utterances=60", "data.max_eval_examples=4",
         "rl.prompts_per_step=4", "rollout.sampling.n=4", "rollout.sampling.max_new_tokens=8",
         "eval_max_new_tokens=8", "rollout.kv_cache_gib=0.25", "train.batch_size=16", "rl.kl_coef=0.05",
         "rollout.num_workers=1", "ray.num_cpus=2"]


@pytest.fixture(scope="module")
def base(tiny_overrides, tmp_path_factory, module_ray):
    return [*tiny_overrides, *SMALL, f"run.output_dir={tmp_path_factory.mktemp('grpo-runs')}"]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def crash_after_checkpoint(cfg, step: int, monkeypatch) -> None:
    """Run `cfg` until just after its step-`step` checkpoint is written, then crash it (KeyboardInterrupt)."""
    original = OnlineRecipe.save_checkpoint

    def stop(self, done, metrics):
        original(self, done, metrics)
        if done == step:
            raise KeyboardInterrupt(f"simulated crash after the step-{step} checkpoint")

    monkeypatch.setattr(OnlineRecipe, "save_checkpoint", stop)
    with pytest.raises(KeyboardInterrupt):
        run_online(cfg)
    monkeypatch.setattr(OnlineRecipe, "save_checkpoint", original)


def test_interrupted_run_resumes_as_the_run_it_continues_and_killed_workers_change_nothing(base, monkeypatch):
    cfg = load_recipe("asr/grpo", [*base, "run.name=resume", "train.steps=4", "train.checkpoint_every=2",
                                   "train.eval_every=4"])
    crash_after_checkpoint(cfg, 2, monkeypatch)
    run_dir = Path(cfg.run.output_dir) / "resume"
    assert [r["step"] for r in rows(run_dir)] == [0, 1], "the crash came before step 2's row was written"

    summary = run_online(cfg, resume=str(run_dir))
    steps = [r["step"] for r in rows(run_dir)]
    assert steps == [0, 1, 2, 3, 4], "resumed run must continue at step 3, without repeating or skipping"
    last = rows(run_dir)[-1]
    for phase in ("generate", "score", "advantages", "update", "sync", "log"):
        assert last[f"time/{phase}"] >= 0.0
    # an evaluation is a phase of its own, on the steps that evaluate only
    assert last["time/evaluate"] > 0.0 and not any("time/evaluate" in r for r in rows(run_dir) if "eval/wer" not in r)
    assert "eval/wer" in last and 0.0 <= last["eval/wer"]
    assert last["train/logprob_gap"] < 1e-3, "trainer and vLLM must agree on the sampled tokens' logprobs"
    assert "train/kl" in last
    assert (run_dir / "final" / "model.safetensors").is_file() and (run_dir / "curves.png").is_file()
    assert summary["steps"] == 4
    # every evaluation (step 0 before the crash, step 4 after the resume) kept each clip's WER, whose
    # mean is the logged one; the demo's interval compares the first with the last
    from speechrl.rlhf.core.intervals import example_table
    from speechrl.rlhf.modes import get_mode

    mode = get_mode(cfg)
    files = mode.example_scores(run_dir)
    assert sorted(files) == [0, 4]
    logged = {r["step"]: r["eval/wer"] for r in rows(run_dir) if "eval/wer" in r}
    for step, path in files.items():
        wers = example_table(path)["eval/wer"]
        assert len(wers) == 4 and sum(wers.values()) / 4 == pytest.approx(logged[step])
    wer = next(c for c in mode.print_run_intervals(str(run_dir)) if c.label == "held-out WER")
    assert wer.name == "step 4" and wer.count == 4 and wer.change == pytest.approx(logged[4] - logged[0])
    assert wer.low - 1e-9 <= wer.change <= wer.high + 1e-9

    # and it is the run it continues: an uninterrupted run logs the same numbers at every step (the
    # engines are reseeded per call from seed, step and call, and the driver's RNG is checkpointed),
    # even one whose rollout worker dies before step 2 generates, whose reward worker dies as step 3
    # scores, and whose rollout worker dies again as step 4's weights are synced: the rollout workers
    # are replaced (and synced), the reward worker restarted by Ray, each call retried
    import ray

    generate, score_batch, sync, killed = OnlineRecipe.generate, OnlineRecipe.score_batch, OnlineRecipe.sync, []

    def kill_rollout_before_step_2(self, requests, **kw):
        if self.step == 1 and not killed:
            ray.kill(self.workers[0])
            killed.append("rollout")
        return generate(self, requests, **kw)

    def kill_reward_while_scoring_step_3(self, batch):
        if self.step == 2 and killed == ["rollout"]:
            ray.kill(self.reward, no_restart=False)  # as a crash would: Ray may bring it back
            killed.append("reward")
        return score_batch(self, batch)

    def kill_rollout_as_step_4_syncs(self, *args):
        if self.step == 3 and killed == ["rollout", "reward"]:
            ray.kill(self.workers[0])
            killed.append("rollout, at the sync")
        return sync(self, *args)

    monkeypatch.setattr(OnlineRecipe, "generate", kill_rollout_before_step_2)
    monkeypatch.setattr(OnlineRecipe, "score_batch", kill_reward_while_scoring_step_3)
    monkeypatch.setattr(OnlineRecipe, "sync", kill_rollout_as_step_4_syncs)
    run_online(load_recipe("asr/grpo", [*base, "run.name=straight", "train.steps=4", "train.checkpoint_every=2",
                                        "train.eval_every=4", "rollout.max_retries=1"]))
    assert killed == ["rollout", "reward", "rollout, at the sync"]
    straight = rows(Path(cfg.run.output_dir) / "straight")
    numbers = lambda row: {k: v for k, v in row.items() if not k.startswith("time/")}  # noqa: E731
    assert [numbers(r) for r in rows(run_dir)] == [numbers(r) for r in straight]

    # the runs ran on this file's Ray (module_ray), which they left running, each killing its own actors
    # and releasing its placement as it ended (the crashed one too): the next run finds every CPU free
    from ray._private.state import actors

    assert ray.is_initialized() and {a["State"] for a in actors().values()} == {"DEAD"}
    deadline = time.monotonic() + 30  # placement groups are removed asynchronously
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


def test_killed_worker_without_retries_fails_clearly(base, monkeypatch):
    import ray

    cfg = load_recipe("asr/grpo", [*base, "run.name=kill-noretry", "train.steps=2", "train.eval_every=2",
                                   "train.checkpoint_every=1", "rollout.max_retries=0"])
    original = OnlineRecipe.generate

    def kill_before_step_1(self, requests, **kw):
        if self.step == 1:
            ray.kill(self.workers[0])
        return original(self, requests, **kw)

    monkeypatch.setattr(OnlineRecipe, "generate", kill_before_step_1)
    with pytest.raises(RuntimeError, match=r"rollout worker 0 died.*--resume"):
        run_online(cfg)


def test_killed_reward_worker_without_retries_stops_the_run_clearly(base, monkeypatch):
    """With no retries, a reward worker that dies as step 2 scores stops the run, naming the checkpoint
    to resume from (with retries, Ray restarts it: the test above)."""
    import ray

    cfg = load_recipe("asr/grpo", [*base, "run.name=kill-reward-0", "train.steps=2", "train.eval_every=2",
                                   "train.checkpoint_every=1", "rollout.max_retries=0"])
    original = OnlineRecipe.score_batch

    def kill_while_scoring_step_2(self, batch):
        if self.step == 1:
            ray.kill(self.reward, no_restart=False)
        return original(self, batch)

    monkeypatch.setattr(OnlineRecipe, "score_batch", kill_while_scoring_step_2)
    with pytest.raises(RuntimeError, match=r"step 1: the reward worker died.*last complete checkpoint is .*step-1; "
                                           r"continue with --resume"):
        run_online(cfg)
    assert (Path(cfg.run.output_dir) / "kill-reward-0" / "checkpoints" / "step-1" / "trainer_state.pt").is_file()


def test_killed_policy_rank_stops_the_run_naming_the_checkpoint_which_resumes_on_one_rank(base, monkeypatch):
    """The policy workers hold the only copy of the weights and optimizer state since the last
    checkpoint: when one of two ranks dies nothing is retried (its peer, waiting in a collective, is
    stopped too), and the run says where to resume from; it resumes there on one rank."""
    import ray

    overrides = [*base, "run.name=kill-policy", "train.steps=2", "train.eval_every=2", "train.checkpoint_every=1",
                 "ray.num_cpus=4"]
    cfg = load_recipe("asr/grpo", [*overrides, "train.num_ranks=2"])
    original = OnlineRecipe.generate

    def kill_rank_1_at_step_1(self, requests, **kw):
        if self.step == 1:
            ray.kill(self.policy.actors[1])
        return original(self, requests, **kw)

    monkeypatch.setattr(OnlineRecipe, "generate", kill_rank_1_at_step_1)
    with pytest.raises(RuntimeError, match=r"a policy worker died.*last complete checkpoint is .*kill-policy/checkpoints/step-1; "
                       r"continue with --resume"):
        run_online(cfg)
    run_dir = Path(cfg.run.output_dir) / "kill-policy"
    assert (run_dir / "checkpoints" / "step-1" / "trainer_state.pt").is_file()
    monkeypatch.setattr(OnlineRecipe, "generate", original)
    summary = run_online(load_recipe("asr/grpo", [*overrides, "train.num_ranks=1"]), resume=str(run_dir))
    assert summary["steps"] == 2 and [r["step"] for r in rows(run_dir)][-1] == 2
    assert rows(run_dir)[-1]["train/logprob_gap"] < 1e-3, "the resumed one-rank policy is the one the engines serve"


def test_lora_run_syncs_its_adapter_after_a_resume_and_to_a_replaced_worker(base, monkeypatch):
    """A LoRA run's engines serve the adapter the policy trains, sent alone: after every step, after a
    resume (the engines start from the base) and to a worker started in place of a dead one. The
    logprob gap says the engines sample from the trained policy; the KL to the base, that it moved."""
    import ray

    from speechrl.rollouts.sync import ObjectStoreTransport

    cfg = load_recipe("asr/grpo", [*base, "run.name=lora", "model.lora.enabled=true", "model.lora.r=8",
                                   "train.lr=0.02", "train.warmup_steps=0", "train.steps=3",
                                   "train.checkpoint_every=1", "train.eval_every=3"])
    sent, send = [], ObjectStoreTransport.send

    def recording_send(self, weights, workers):
        sent.append(type(weights).__name__)
        return send(self, weights, workers)

    monkeypatch.setattr(ObjectStoreTransport, "send", recording_send)
    crash_after_checkpoint(cfg, 1, monkeypatch)
    generate, killed = OnlineRecipe.generate, []

    def kill_rollout_before_step_3(self, requests, **kw):
        if self.step == 2 and not killed:
            ray.kill(self.workers[0])
            killed.append(self.step)
        return generate(self, requests, **kw)

    monkeypatch.setattr(OnlineRecipe, "generate", kill_rollout_before_step_3)
    run_online(cfg, resume=str(Path(cfg.run.output_dir) / "lora"))
    assert killed == [2]
    # step 1's sync, the resume's, step 2's, the replaced worker's, step 3's
    assert sent == ["LoraAdapter"] * 5
    trained = [r for r in rows(Path(cfg.run.output_dir) / "lora") if "train/logprob_gap" in r]
    assert [r["step"] for r in trained] == [1, 2, 3]
    for r in trained[1:]:
        assert r["train/logprob_gap"] < 1e-3 < r["train/kl"], r


def test_asr_online_dpo_pairs_each_clips_best_and_worst_transcript_and_offline_dpo_reads_them(base):
    """recipes/asr/online_dpo.yaml: two rounds; each round's pairs name their clip and reference, the
    chosen transcript scored above the rejected one by the WER reward. recipes/asr/dpo.yaml then trains
    on the run's pairs/ folder, skipping a bad row it names."""
    cfg = load_recipe("asr/online_dpo", [*base, "run.name=odpo", "dpo.min_reward_gap=0", "train.steps=2",
                                         "train.eval_every=2", "train.checkpoint_every=2"])
    run_online(cfg)
    run_dir = Path(cfg.run.output_dir) / "odpo"
    logged = [r for r in rows(run_dir) if "time/step" in r]
    assert len(logged) == 2 and "eval/wer" in logged[-1]
    pairs = [json.loads(line) for f in sorted((run_dir / "pairs").glob("round-*.jsonl"))
             for line in f.read_text().splitlines()]
    assert pairs, "no pairs in two rounds of 4 clips x 4 transcripts"
    for p in pairs:
        assert p["chosen"]["reward"] > p["rejected"]["reward"] and p["reference"] and Path(p["audio"]).is_file()
    assert any(r["train/pairs"] > 0 and "train/reward_margin" in r for r in logged)

    from speechrl.rlhf.trainers.dpo import run_dpo

    with open(run_dir / "pairs" / "zz-bad.jsonl", "w") as f:
        f.write(json.dumps({"id": "x", "audio": "/nowhere.wav", "chosen": {"text": "go left"},
                            "rejected": {"text": "go"}}) + "\n")
    offline = load_recipe("asr/dpo", [*[o for o in base if not o.startswith("rl.")], "run.name=dpo",
                                      f"dpo.data={run_dir / 'pairs'}", f"run.init_from={run_dir / 'final'}",
                                      "train.steps=2", "train.batch_size=4", "train.eval_every=2",
                                      "train.checkpoint_every=2", "train.log_every=1"])
    summary = run_dpo(offline)
    assert summary["preference pairs"] == len(pairs)
    skipped = summary["preference data"]["bad"]  # also logged as a warning
    assert len(skipped) == 1 and "zz-bad.jsonl:1" in skipped[0] and "/nowhere.wav" in skipped[0]
    trained = [r for r in rows(Path(offline.run.output_dir) / "dpo") if "train/loss" in r]
    assert trained and all(0 < r["train/loss"] < 10 for r in trained)
