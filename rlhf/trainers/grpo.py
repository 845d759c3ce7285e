"""The GRPO driver: one process steering Ray actors through named phases.

    generate   rollout workers (vLLM) sample n completions per prompt, token in / token out
               (realtime: multi-turn episodes, one generate call per turn, rlhf/episodes.py)
    score      the reward worker scores them; failed or NaN samples are marked, not fatal
    advantages group-normalized rewards (pure function, by registered name; PPO: values and GAE, rlhf/ppo.py)
    update     the policy worker makes the optimizer step(s)
    sync       the new weights go to every engine through the recipe's transport
    log        metrics, timers, evaluation, checkpoint

Each phase is timed and the times are logged every step (`time/<phase>`).
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from speechrl.rlhf.modes import assets
from speechrl.rlhf.algos import ADVANTAGES
from speechrl.rlhf.core.config import RecipeConfig
from speechrl.rlhf.modes.evaluate import log_examples
from speechrl.rlhf.model.backbone import load_processor
from speechrl.rlhf.modes.drift import DriftEvaluation
from speechrl.rlhf.modes.episodes import run_episodes
from speechrl.rlhf.core.seeding import seed_everything
from speechrl.rlhf.workers.policy_worker import make_policy_worker
from speechrl.rlhf.modes.realtime_data import UserSpeech, load_dialogues
from speechrl.rlhf.trainers.judges import prebuild_judges
from speechrl.rlhf.workers.rl_setup import rl_prompt_pool, start_ray
from speechrl.rlhf.core.run_dir import (RunLogger, find_resume_dir, latest_checkpoint, new_run_dir, prune_checkpoints,
                                   resume_run, write_trainer_state)
from speechrl.rlhf.trainers.sft import batch_indices
from speechrl.rlhf.modes.tasks import make_task
from speechrl.rlhf.modes.tts_eval import TtsEvaluation, eval_plot_keys, headline_rows
from speechrl.rollouts.engine import RolloutWorkerDied, generate_across, make_rollout_workers
from speechrl.rollouts.sync import TRANSPORTS
from speechrl.rollouts.types import RolloutRequest

log = logging.getLogger(__name__)


class PhaseTimer:
    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        total = sum(self.times.values())
        out = {f"time/{k}": v for k, v in self.times.items()}
        out["time/step"] = total
        self.times = {}
        return out


class GRPORecipe:
    def __init__(self, cfg: RecipeConfig, resume: Optional[str] = None):
        self.cfg, self.resume = cfg, resume

    def setup(self) -> None:
        import ray

        from speechrl.rewards.worker import make_reward_actor

        cfg = self.cfg
        seed_everything(cfg.seed)
        start_ray(cfg)
        self.run_dir = find_resume_dir(cfg, self.resume) if self.resume else new_run_dir(cfg)
        checkpoint = latest_checkpoint(self.run_dir) if self.resume else None
        self._task_and_data()
        prebuild_judges(cfg)  # here on every core, not inside a one-thread reward actor
        self.policy = make_policy_worker(cfg, self.backbone_path, str(checkpoint) if checkpoint else None,
                                         allowed_ids=self.allowed_ids)
        self.reward = make_reward_actor(cfg.rewards, codec=self.task.reward_codec)
        if cfg.mode == "asr":
            self.policy.set_eval_set.remote(self.eval_set)
        self.workers = make_rollout_workers(str(self.backbone_path), cfg.rollout, cfg.rollout.num_workers, cfg.seed)
        self.transport = TRANSPORTS.get(cfg.rollout.weight_transport)()
        self.logger = RunLogger(self.run_dir, cfg, plot_keys=[
            "rewards/total", *eval_plot_keys(cfg.mode)[:2], "train/kl", "train/logprob_gap", "rewards/unscored"])
        self.tts_eval = TtsEvaluation(cfg, self.task, self.eval_set, self.run_dir, self.logger) \
            if cfg.mode == "tts" else None
        self.checkpoint = checkpoint
        self.start_step = resume_run(checkpoint, self.logger) if checkpoint else 0
        if checkpoint:
            self.sync()  # engines started from the backbone; give them the resumed weights
        ray.get(self.policy.ping.remote())

    def setup_drift_evaluation(self, out_dir: Path) -> None:
        """Only what a realtime `evaluate` needs, into `out_dir`: the engines serving the backbone as
        saved (run.init_from), the reward worker and the drift dialogues; no policy worker, no run
        directory. `speechrl eval` of a realtime checkpoint."""
        from speechrl.rewards.worker import make_reward_actor

        cfg = self.cfg
        if cfg.mode != "realtime":
            raise ValueError(f"drift evaluation is for realtime recipes; this one's mode is {cfg.mode!r}")
        seed_everything(cfg.seed)
        start_ray(cfg)
        self.run_dir, self.policy = Path(out_dir), None
        self._task_and_data()
        prebuild_judges(cfg)
        self.reward = make_reward_actor(cfg.rewards, codec=self.task.reward_codec)
        self.workers = make_rollout_workers(str(self.backbone_path), cfg.rollout, cfg.rollout.num_workers, cfg.seed)

    def _task_and_data(self) -> None:
        """The backbone's task (TTS, realtime: it builds the codec, once, before any worker needs it)
        and the mode's data: the dialogues and drift evaluation, or the train and held-out sets."""
        cfg = self.cfg
        self.backbone_path = assets.backbone_path(cfg)
        processor = load_processor(self.backbone_path)  # the driver needs no weights
        self.task = make_task(cfg, processor)
        self.allowed_ids = self.task.allowed_ids
        window = processor.feature_extractor.n_samples / processor.feature_extractor.sampling_rate
        if cfg.mode == "realtime":
            self.dialogues, drift = load_dialogues(cfg)
            self.speech = UserSpeech(cfg.data.sample_rate, window)
            self.drift = DriftEvaluation(cfg, self.task, drift, self.speech, self.run_dir)
        else:
            self.train_set, self.eval_set = assets.load_datasets(cfg, window)
            self.prompt_pool = rl_prompt_pool(cfg, self.eval_set)

    def rollout(self, step: int) -> tuple[list[RolloutRequest], list]:
        """The step's prompts and their samples (`Sample.prompt_index` points into the prompts). In
        realtime mode a prompt is one turn of one episode: the step's episodes play all their turns."""
        if self.cfg.mode != "realtime":
            requests = self.requests(step)
            return requests, self.generate(requests, step)
        idx = batch_indices(len(self.dialogues), self.cfg.rl.prompts_per_step, step, self.cfg.seed)
        return run_episodes(self.task, [self.dialogues[int(i)] for i in idx], self.speech, self.cfg.realtime.max_turns,
                            lambda requests: self.generate(requests, step), n=self.cfg.rollout.sampling.n)

    def requests(self, step: int) -> list[RolloutRequest]:
        if self.prompt_pool is not None:  # text-only TTS prompts: no clip, no voice prompt
            idx = batch_indices(len(self.prompt_pool), self.cfg.rl.prompts_per_step, step, self.cfg.seed)
            return [self.task.request(self.prompt_pool[int(i)], None) for i in idx]
        idx = batch_indices(len(self.train_set), self.cfg.rl.prompts_per_step, step, self.cfg.seed)
        return [self.task.request(*self.train_set[int(i)], self.train_set) for i in idx]

    def generate(self, requests, step: int, n: Optional[int] = None, temperature: Optional[float] = None,
                 max_new_tokens: Optional[int] = None):
        """n samples per request (default: the recipe's sampling settings); evaluation passes its own."""
        s = self.cfg.rollout.sampling
        n = s.n if n is None else n
        temperature = s.temperature if temperature is None else temperature
        max_new_tokens = s.max_new_tokens if max_new_tokens is None else max_new_tokens
        for attempt in range(self.cfg.rollout.max_retries + 1):
            try:
                # no per-request seed: vLLM 0.32 on CPU fails on them ("CPU Generator does not use
                # offset"); each engine is seeded at start, so runs are reproducible, resumed ones not bit-exact
                return generate_across(self.workers, requests, n=n, temperature=temperature, top_p=s.top_p,
                                       max_new_tokens=max_new_tokens, seed=None, allowed_token_ids=self.allowed_ids,
                                       stop_token_ids=self.task.stop_ids)
            except RolloutWorkerDied as e:
                if attempt == self.cfg.rollout.max_retries:
                    raise RuntimeError(f"step {step}: {e}; gave up after {attempt + 1} attempts. The last "
                                       f"checkpoint is in {self.run_dir}; continue with --resume") from e
                log.warning("step %d: %s; restarting it and retrying the step", step, e)
                self.workers[e.worker_index] = make_rollout_workers(
                    str(self.backbone_path), self.cfg.rollout, 1, self.cfg.seed + 1000 + attempt)[0]
                self.sync()

    def score(self, samples, requests):
        batch = {"completions": [s.text for s in samples], "completion_ids": [s.completion_ids for s in samples],
                 "mode": self.cfg.mode}
        if self.cfg.mode != "asr":  # codec ids; the reward side decodes them to waveforms (when it has a codec)
            batch["codec_ids"] = [self.task.codec_ids(s.completion_ids) for s in samples]
        else:  # each prompt's clip once per sample; the object store ships each distinct array once
            batch.update(sample_rate=self.cfg.data.sample_rate, audio=[requests[s.prompt_index].audio for s in samples])
        for key in samples[0].metadata:
            batch[key] = [s.metadata.get(key) for s in samples]
        return self.score_batch(batch)

    def score_batch(self, batch: dict):
        import ray

        return ray.get(self.reward.score.remote(batch))

    def advantages(self, samples, scores, requests) -> np.ndarray:
        g = self.cfg.grpo
        rewards = torch.tensor(np.nan_to_num(scores.total, nan=0.0), dtype=torch.float32)
        groups = torch.tensor([s.prompt_index for s in samples])
        valid = torch.tensor(scores.valid, dtype=torch.bool)
        return ADVANTAGES.get(g.advantage)(rewards, groups, valid, std_normalize=g.std_normalize).numpy()

    def update(self, samples, requests, adv) -> dict:
        keep = [i for i, s in enumerate(samples) if s.completion_ids]  # an empty completion has no tokens to train
        return self.policy_update(samples, requests, keep, adv[keep].tolist())

    def policy_update(self, samples, requests, keep: list[int], advantages: list, **critic) -> dict:
        """The policy worker's optimizer steps on the samples `keep`; `advantages` are theirs, in
        that order (PPO adds the critic's `returns` and `old_values`)."""
        import ray

        return ray.get(self.policy.update.remote(
            [samples[i].prompt_ids for i in keep], [samples[i].completion_ids for i in keep],
            [samples[i].logprobs for i in keep], [requests[samples[i].prompt_index].audio for i in keep],
            advantages, self.cfg.rollout.sampling.temperature, **critic))

    def save_rollouts(self, step: int, samples, scores) -> Path:
        """The step's samples with their rewards, one JSON row each: what `speechrl annotate tasks`
        turns into pairs for annotators (TTS rows hold codec ids, decoded with the run's codec)."""
        rows = []
        for i, s in enumerate(samples):
            row = {"step": step, "prompt_index": s.prompt_index, "sample": i,
                   **{k: v for k, v in s.metadata.items() if k != "reference_codec_ids"},
                   "reward": _finite(scores.total[i]),
                   "components": {k: _finite(v[i]) for k, v in scores.components.items()}}
            if self.cfg.mode != "asr":
                row["codec_ids"] = [int(c) for c in self.task.codec_ids(s.completion_ids)]
                if s.metadata.get("reference_codec_ids") is not None:
                    row["voice_codec_ids"] = [int(c) for c in s.metadata["reference_codec_ids"]]
            if self.cfg.mode != "tts":
                row["completion"] = s.text
            if i in scores.errors:
                row["unscored"] = scores.errors[i]
            rows.append(row)
        path = self.run_dir / "rollouts" / f"step-{step:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def sync(self) -> None:
        import ray

        if self.policy is None:  # a checkpoint's evaluation: the engines serve it as saved
            return
        self.transport.send(ray.get(self.policy.weights.remote()), self.workers)

    def evaluate(self, step: int) -> dict:
        import ray

        cap = self.cfg.eval_max_new_tokens
        if self.cfg.mode == "realtime":  # greedy drift dialogues on the engines, which hold the current weights
            return self.drift.evaluate(step, lambda requests: self.generate(requests, step, n=1, temperature=0.0,
                                                                            max_new_tokens=cap), self.score)
        if self.tts_eval is None:
            return log_examples(ray.get(self.policy.evaluate.remote()), log)
        # held-out synthesis on the engines, which hold the policy's current weights
        requests = [RolloutRequest(p, None, self.cfg.data.sample_rate) for p in self.tts_eval.prompts]
        samples = self.generate(requests, step, n=1, temperature=self.cfg.tts.eval_temperature, max_new_tokens=cap)
        return self.tts_eval.evaluate(step, [s.completion_ids for s in samples], self.score_batch)

    def train(self) -> dict:
        cfg, timer = self.cfg, PhaseTimer()
        if self.start_step == 0:
            self.logger.log(0, self.evaluate(0))  # the starting policy: "WER before" in the summary
        start = time.time()
        bar = tqdm(range(self.start_step, cfg.train.steps), initial=self.start_step, total=cfg.train.steps,
                   desc=cfg.algorithm, unit="step", dynamic_ncols=True)
        for step in bar:
            done, self.step = step + 1, step
            with timer("generate"):
                requests, samples = self.rollout(step)
            with timer("score"):
                scores = self.score(samples, requests)
            with timer("advantages"):
                adv = self.advantages(samples, scores, requests)
            if cfg.run.save_rollouts_every and done % cfg.run.save_rollouts_every == 0:
                self.save_rollouts(done, samples, scores)
            with timer("update"):
                metrics = self.update(samples, requests, adv)
            with timer("sync"):
                self.sync()
            with timer("log"):
                metrics.update(scores.metrics())
                metrics["rollout/completion_tokens"] = float(np.mean([len(s.completion_ids) for s in samples]))
                metrics["rollout/truncated"] = float(np.mean([s.finish_reason == "length" for s in samples]))
                if done % cfg.train.eval_every == 0 or done == cfg.train.steps:
                    metrics.update(self.evaluate(done))
            metrics.update(timer.pop())
            if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
                began = time.perf_counter()
                self.save_checkpoint(done, metrics)
                metrics["time/checkpoint"] = time.perf_counter() - began
            self.logger.log(done, metrics)
            # the first reward as scored (the total is ~0 when every component is z-normalized)
            first = f"rewards/{cfg.rewards[0].key}/reward"
            bar.set_postfix({cfg.rewards[0].key: f"{metrics.get(first, float('nan')):.3f}",
                             **{key.split("/")[-1]: f"{metrics[key]:.3f}" for key in eval_plot_keys(cfg.mode)[:1]
                                if key in metrics}})
        self.elapsed = time.time() - start
        return self.finish()

    def save_checkpoint(self, step: int, metrics: dict) -> None:
        import ray

        path = self.run_dir / "checkpoints" / f"step-{step}"
        ray.get(self.policy.save.remote(str(path)))
        self.save_state(path)
        write_trainer_state(path, step, metrics)  # the row travels with it: see write_trainer_state
        prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)

    def save_state(self, path: Path) -> None:
        """The driver's own state for a checkpoint (GRPO has none; PPO's KL controller)."""

    def finish(self) -> dict:
        import ray

        final = ray.get(self.policy.save_final.remote(str(self.run_dir / "final")))
        last = self.logger.last
        steps = [r for r in self.logger.rows() if "time/step" in r]
        phases = sorted({k for r in steps for k in r if k.startswith("time/")})
        phase = {k: float(np.mean([r[k] for r in steps if k in r])) for k in phases}
        table = {
            "run": str(self.run_dir),
            "steps": self.cfg.train.steps,
            **headline_rows(self.cfg.mode, self.logger),
            # the total is ~0 when the rewards are z-normalized; each reward's own mean says more
            "mean reward (last step)": last("rewards/total"),
            **{f"mean {spec.key} (last step)": last(f"rewards/{spec.key}/reward") for spec in self.cfg.rewards},
            "logprob gap vLLM/trainer": last("train/logprob_gap"),
            "unscored samples (total)": int(sum(r.get("rewards/unscored", 0) for r in steps)),
            **{f"mean {k} (s)": round(v, 3) for k, v in phase.items()},
            "train wall time (s)": round(self.elapsed, 1),
            "final weights": final,
        }
        if self.cfg.mode == "realtime":
            table["drift plot"] = str(self.drift.plot_path)
        self.logger.plot()
        print(self.logger.summary(table))
        self.logger.close()
        return table

    def cleanup(self) -> None:
        import ray

        if ray.is_initialized() and not self.cfg.ray.address:
            ray.shutdown()


def run_grpo(cfg: RecipeConfig, resume: Optional[str] = None, recipe_class: type = GRPORecipe) -> dict:
    recipe = recipe_class(cfg, resume)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()


def _finite(value) -> Optional[float]:
    value = float(value)
    return value if np.isfinite(value) else None
