"""The online loop, one for every online algorithm (GRPO, PPO, online DPO), as timed named phases.

generate, score, advantages, update, sync, log; each is logged as `time/<phase>`. With async rollouts
(trainers/pipeline.py) generate and score run in a producer thread, and the loop's own first phase is
`wait`, for a batch not ready yet. Failed or NaN rewards
are marked, not fatal. Mode and algorithm differences live in the mode and update objects (modes/,
algos/updates.py), so this file tests neither's name.
"""
from __future__ import annotations

import functools
import itertools
import hashlib
import json
import logging
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from speechrl.rlhf.algos import UPDATES
from speechrl.rlhf.core.config import RecipeConfig, RecipeError, RunStopped
from speechrl.rlhf.core.run_dir import (RunLogger, due, find_resume_dir, latest_checkpoint, new_run_dir,
                                        resume_hint, resume_run, stop_on_write_error, write_trainer_state,
                                        writing_checkpoint)
from speechrl.rlhf.core.seeding import seed_everything
from speechrl.rlhf.model.backbone import load_processor
from speechrl.rlhf.model.mtp import AcceptanceMeter
from speechrl.rlhf.modes import get_mode
from speechrl.rlhf.modes.base import optional
from speechrl.rlhf.trainers.judges import prebuild_judges
from speechrl.rlhf.trainers.pipeline import RolloutPipeline
from speechrl.rlhf.workers.placement import release, reserve
from speechrl.rlhf.workers.policy_group import PolicyClient, make_policy_workers
from speechrl.rlhf.workers.ray_setup import start_ray
from speechrl.rollouts.engine import RolloutWorkerDied, generate_across, make_rollout_workers
from speechrl.rollouts.sync import TRANSPORTS

log = logging.getLogger(__name__)


class PhaseTimer:
    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - start

    def add(self, seconds: dict[str, float]) -> None:
        """Phases timed elsewhere (`OnlineRecipe.produce` times its own)."""
        for phase, value in seconds.items():
            self.times[phase] = self.times.get(phase, 0.0) + value

    def pop(self) -> dict[str, float]:
        total = sum(self.times.values())
        out = {f"time/{k}": v for k, v in self.times.items()}
        out["time/step"] = total
        self.times = {}
        return out


class OnlineRecipe:
    def __init__(self, cfg: RecipeConfig, resume: Optional[str] = None):
        self.cfg, self.resume = cfg, resume
        self.mode = get_mode(cfg)
        self.step = 0
        self.pipeline: Optional[RolloutPipeline] = None  # rollout.async: batches made while the trainer updates
        self.engine_weights = None  # what the engines were last sent (None: the backbone they started from)
        self._engine_calls: dict[int, int] = {}  # generate calls so far, per step (next_engine_seed)
        self._seed_lock = threading.Lock()
        self.mtp_meter = AcceptanceMeter()  # rollout.mtp_tokens: acceptance between log calls

    def setup(self) -> None:
        cfg = self.cfg
        self.run_dir = find_resume_dir(cfg, self.resume) if self.resume else new_run_dir(cfg)
        self.checkpoint = latest_checkpoint(self.run_dir) if self.resume else None
        self.update = UPDATES.get(cfg.algorithm)(cfg, self.checkpoint)
        self.logger = RunLogger(self.run_dir, cfg, plot_keys=[
            "rewards/total", *self.mode.plot_keys()[:2], "train/kl", "train/logprob_gap", "rollout/entropy",
            "rewards/unscored"])
        started = time.time()
        self._start_actors()
        self.record_placement()  # waits for the policy workers too
        self.start_step = resume_run(self.checkpoint, self.logger) if self.checkpoint else 0
        if self.checkpoint:
            self.sync()  # engines started from the backbone; give them the resumed weights
        self.policy.ping()
        self.startup_s = time.time() - started

    def setup_evaluation(self, out_dir: Path) -> None:
        """Only what `speechrl eval` of a mode that evaluates on engines needs, into `out_dir`: the
        engines serving the backbone as saved (run.init_from), the reward worker and the mode's
        held-out data; no policy worker, no run directory."""
        self.run_dir, self.policy, self.logger = Path(out_dir), None, None
        self._start_actors(with_policy=False)

    def _start_actors(self, with_policy: bool = True) -> None:
        """Ray and the run's placement group (a bundle for the policy worker unless `with_policy` is
        False), the mode's task and data, the embedded judges, the policy workers (unless `with_policy`
        is False), the reward worker and the engines."""
        from speechrl.rewards.worker import make_reward_actor

        cfg = self.cfg
        seed_everything(cfg.seed)
        self.owns_ray = start_ray(cfg)
        self.placement = reserve(cfg, policy=with_policy)
        self.transport = TRANSPORTS.get(cfg.rollout.weight_transport)(cfg.rollout)
        if with_policy:
            self.transport.check(cfg, self.placement)
        # the engines join the policy worker's weight-transfer group (an evaluation's have no policy)
        self.weight_transfer = self.transport.backend if with_policy and self.transport.direct else None
        if with_policy and cfg.rollout.async_.enabled and self.placement.engines_sleep:
            raise RecipeError(f"rollout.async needs engines that stay awake while the trainer updates; ray.layout="
                              f"{self.placement.layout} puts them to sleep on the trainer's GPU. Use "
                              "ray.layout=separate, or rollout.async.enabled=false")
        self.backbone_path = self.mode.backbone_path()
        processor = load_processor(self.backbone_path)  # the driver needs no weights
        self.task = self.mode.setup_task(processor)  # builds the codec, once, before any worker needs it
        window = processor.feature_extractor.n_samples / processor.feature_extractor.sampling_rate
        self.mode.setup_online(self.run_dir, self.logger, window)
        prebuild_judges(cfg)  # here on every core, not inside a one-thread reward actor
        # the policy workers load (imports, weights, optimizer) while the engines start, each seconds to
        # minutes; not where they share a GPU: vLLM sizes its KV cache by the memory free as it starts
        policy_first = with_policy and not self.placement.engines_sleep
        if policy_first:
            self._start_policy()
        # scoring takes its turn like generation and the update: a model judge may use every core then
        self.reward = make_reward_actor(cfg.rewards, codec=self.task.reward_codec, retries=cfg.rollout.max_retries,
                                        threads=cfg.train.torch_threads)
        # a LoRA run's engines serve its adapter on the frozen base (sync sends the adapter alone);
        # an evaluation's engines serve the saved, merged weights as they are
        self.lora_rank = cfg.model.lora.r if cfg.model.lora.enabled and with_policy else 0
        self.workers = make_rollout_workers(str(self.backbone_path), cfg.rollout, cfg.rollout.num_workers, cfg.seed,
                                            [self.placement.options(e) for e in self.placement.engines],
                                            sleep_mode=self.placement.engines_sleep, lora_rank=self.lora_rank,
                                            weight_transfer=self.weight_transfer)
        if with_policy and not policy_first:
            self._start_policy()

    def _start_policy(self) -> None:
        """The policy worker of each trainer rank, from the run's checkpoint where it resumes; returns
        as they start (record_placement waits for them)."""
        cfg = self.cfg
        self.policy = PolicyClient(make_policy_workers(
            cfg, self.backbone_path, str(self.checkpoint) if self.checkpoint else None, allowed_ids=self.task.allowed_ids,
            reference=self.update.needs_reference, critic=self.update.needs_critic,
            options=[self.placement.options(o) for o in self.placement.policies]), run_dir=self.run_dir)

    def generate(self, requests, n: Optional[int] = None, temperature: Optional[float] = None,
                 max_new_tokens: Optional[int] = None, step: Optional[int] = None,
                 engine_seed: Optional[int] = None):
        """n samples per request (default: the recipe's sampling settings); evaluation passes its own.
        `step`: the batch they are for (default: the loop's step; the async producer's is ahead).
        `engine_seed`: the engines' seed for this call (default: `next_engine_seed`'s).
        A rollout worker that dies is replaced and the call retried (rollout.max_retries)."""
        s = self.cfg.rollout.sampling
        n = s.n if n is None else n
        temperature = s.temperature if temperature is None else temperature
        max_new_tokens = s.max_new_tokens if max_new_tokens is None else max_new_tokens
        if engine_seed is None:
            engine_seed = self.next_engine_seed(self.step if step is None else step)
        for attempt in range(self.cfg.rollout.max_retries + 1):
            try:
                # The engines are reseeded for every call from (seed, step, call), so a resumed run, or one
                # whose worker was replaced, samples what the uninterrupted run did. Per-request seeds
                # would not touch the engines, but vLLM 0.32 on CPU fails on them (RolloutEngine.reseed).
                return generate_across(self.workers, requests, n=n, temperature=temperature, top_p=s.top_p,
                                       max_new_tokens=max_new_tokens, seed=None, allowed_token_ids=self.task.allowed_ids,
                                       stop_token_ids=self.task.stop_ids, engine_seed=engine_seed)
            except RolloutWorkerDied as e:
                if self.pipeline is not None and self.pipeline.stopping:
                    raise  # the run is ending: its engines are going, none is started again
                self.replace_worker(e, attempt)
                self.sync(self.engine_weights)  # the weights the other engines hold (None: the policy's)

    def next_engine_seed(self, step: int) -> int:
        """The engines' seed for the next generate call: a hash of (run seed, step, the call's number
        within the step), so it depends on where the run is, not on what the engines did before, nor
        on which thread asked first (the async producer generates for later steps than the loop)."""
        with self._seed_lock:
            calls = self._engine_calls.get(step, 0)
            self._engine_calls[step] = calls + 1
            if len(self._engine_calls) > 64:  # steps long past; the producer runs at most a few ahead
                del self._engine_calls[min(self._engine_calls)]
        return _seed_of(f"{self.cfg.seed}|{step}|{calls}")

    def evaluation_generate(self):
        """`generate` for one evaluation: with `eval_draws: same`, its k-th call draws with the seed of
        (run seed, k) at every evaluation, so two evaluations differ only by the weights and the changes
        a run logs are paired, as `speechrl eval`'s are; with `per_step`, the step's fresh draws. The
        training batches' draws are the same either way (their seeds never count these calls)."""
        if self.cfg.eval_draws == "per_step":
            return self.generate
        calls = itertools.count()
        return lambda requests, **kw: self.generate(
            requests, engine_seed=_seed_of(f"{self.cfg.seed}|eval|{next(calls)}"), **kw)

    def score(self, samples, requests):
        batch = {"completions": [s.text for s in samples], "completion_ids": [s.completion_ids for s in samples],
                 "mode": self.cfg.mode, **self.mode.reward_columns(samples, requests)}
        for key in samples[0].metadata:
            batch[key] = [s.metadata.get(key) for s in samples]
        return self.score_batch(batch)

    def score_batch(self, batch: dict):
        """The reward worker's scores. Ray restarts a dead reward worker and retries the call
        (rollout.max_retries times); past that the run stops with the checkpoint to resume from."""
        import ray
        from ray.exceptions import RayActorError

        try:
            return ray.get(self.reward.score.remote(batch))
        except RayActorError as e:
            raise RunStopped(f"step {self.step}: the reward worker died ({type(e).__name__}) and was not brought "
                             f"back after rollout.max_retries={self.cfg.rollout.max_retries} restarts; "
                             f"{self.stopped_hint()}") from e

    def stopped_hint(self) -> str:
        """What a stopped run's message ends with: where training continues from (an evaluation of a
        checkpoint saves nothing and is simply run again)."""
        return resume_hint(self.run_dir) if self.policy is not None else "nothing was saved; run it again"

    def save_rollouts(self, step: int, samples, scores) -> Path:
        """The step's samples with their rewards, one JSON row each: what `speechrl annotate tasks`
        turns into pairs for annotators (codec ids are decoded with the run's codec)."""
        rows = []
        for i, s in enumerate(samples):
            row = {"step": step, "prompt_index": s.prompt_index, "sample": i,
                   **{k: v for k, v in s.metadata.items() if k != "reference_codec_ids"},
                   "reward": optional(scores.total[i]),
                   "components": {k: optional(v[i]) for k, v in scores.components.items()},
                   **self.mode.rollout_row(s)}
            if i in scores.errors:
                row["unscored"] = scores.errors[i]
            rows.append(row)
        path = self.run_dir / "rollouts" / f"step-{step:05d}.jsonl"
        with stop_on_write_error(self.run_dir, f"step {step}'s rollouts"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def replace_worker(self, died: RolloutWorkerDied, attempt: int) -> None:
        """A fresh rollout worker in place of the dead one (it gets the weights at the next sync), or,
        past rollout.max_retries attempts, the run stops saying where to resume from."""
        if attempt == self.cfg.rollout.max_retries:
            raise RunStopped(f"step {self.step}: {died}; gave up after {attempt + 1} attempts; "
                             f"{self.stopped_hint()}") from died
        log.warning("step %d: %s; restarting it and retrying the step", self.step, died)
        k = died.worker_index
        self.workers[k] = make_rollout_workers(str(self.backbone_path), self.cfg.rollout, 1,
                                               (self.cfg.seed + 1000 + attempt) % 2**32,
                                               [self.placement.options(self.placement.engines[k])],
                                               sleep_mode=self.placement.engines_sleep, lora_rank=self.lora_rank,
                                               weight_transfer=self.weight_transfer)[0]

    def sync(self, weights=None) -> None:
        """`weights` (default: the policy's now) to every engine (in a LoRA run its adapter alone:
        PolicyWorker.weights). An engine that dies while loading them is replaced and the sync sent
        again (the soak run found this: a kill during the sync stopped the run)."""
        if self.policy is None:  # a checkpoint's evaluation: the engines serve it as saved
            return
        direct = self.transport.direct and not self.lora_rank  # the policy worker sends (weight transfer)
        if weights is None and not direct:
            weights = self.policy.stored_weights()
        # kept for a replaced engine only where the engines may lag the policy (async): a synchronous
        # run's engines hold the policy's weights, and the reference would keep a copy in the store
        self.engine_weights = weights if self.cfg.rollout.async_.enabled else None
        for attempt in range(self.cfg.rollout.max_retries + 1):
            try:
                if weights is None:
                    self.transport.sync(self.policy, self.workers)
                else:
                    self.transport.send(weights, self.workers)
                return
            except RolloutWorkerDied as e:
                self.replace_worker(e, attempt)

    def engines_call(self, method: str) -> None:
        """`sleep` or `wake_up` on every engine, where the layout shares their GPU with the trainer.
        A dead engine is left for the next generate or sync to replace."""
        if not self.placement.engines_sleep:
            return
        import ray
        from ray.exceptions import RayActorError

        for worker in self.workers:
            try:
                ray.get(getattr(worker, method).remote())
            except RayActorError as e:
                log.warning("step %d: a rollout worker died during %s (%s)", self.step, method, type(e).__name__)

    def evaluate(self, step: int) -> dict:
        with self.pipeline.engines() if self.pipeline else nullcontext():  # the producer waits meanwhile
            return self.mode.evaluate_online(step, self.evaluation_generate(), self.score_batch, self.score,
                                             self.policy)

    def produce(self, step: int) -> tuple:
        """Batch `step`'s rollout and scores, and the seconds each took: one step's generate and score
        phases (the async producer calls it for steps ahead of the loop's)."""
        began = time.perf_counter()
        requests, samples = self.mode.rollout(step, functools.partial(self.generate, step=step))
        generated = time.perf_counter()
        scores = self.score(samples, requests)
        return requests, samples, scores, {"generate": generated - began, "score": time.perf_counter() - generated}

    def next_batch(self, step: int, timer: PhaseTimer) -> tuple:
        """Batch `step`'s requests, samples and scores, and the async statistics to log: made now (the
        generate and score phases), or taken from the async producer (the `wait` phase: what is not
        ready yet)."""
        if self.pipeline is None:
            requests, samples, scores, seconds = self.produce(step)
            timer.add(seconds)
            return requests, samples, scores, {}
        with timer("wait"):
            item, dropped = self.pipeline.take(step)
        return item.requests, item.samples, item.scores, {
            "async/staleness": float(step - item.version), "async/dropped": float(dropped),
            **{f"async/{k}_s": v for k, v in item.seconds.items()}}

    def send_weights(self, version: int) -> None:
        """The updated policy to the engines now, or, with async rollouts, published for the producer,
        which loads it before its next batch."""
        if self.pipeline is None:
            self.sync()
        else:
            self.pipeline.publish(version, self.policy.stored_weights())

    def start_pipeline(self) -> Optional[RolloutPipeline]:
        """The async producer (rollout.async.enabled), or None for the synchronous loop."""
        a = self.cfg.rollout.async_
        if not a.enabled:
            return None
        if self.engine_weights is None:  # what a replaced engine must get until the first publish
            self.engine_weights = self.policy.stored_weights()
        log.info("async rollouts: max_staleness=%d, on_stale=%s", a.max_staleness, a.on_stale)
        return RolloutPipeline(self.produce, self.sync, start_step=self.start_step, end_step=self.cfg.train.steps,
                               max_staleness=a.max_staleness, on_stale=a.on_stale).start()

    def train(self) -> dict:
        cfg, timer = self.cfg, PhaseTimer()
        self.step = self.start_step
        if self.start_step == 0:
            self.logger.log(0, self.evaluate(0))  # the starting policy: "WER before" in the summary
        start = time.time()
        self.pipeline = self.start_pipeline()
        bar = tqdm(range(self.start_step, cfg.train.steps), initial=self.start_step, total=cfg.train.steps,
                   desc=cfg.algorithm, unit="step", dynamic_ncols=True)
        for step in bar:
            done, self.step = step + 1, step
            requests, samples, scores, produced = self.next_batch(step, timer)
            with timer("advantages"):
                batch, update_metrics = self.update.prepare(samples, scores, requests, self.policy)
                if batch is not None and batch.pairs:  # online DPO's pairs, kept in the mode's format
                    self.mode.save_pairs(self.run_dir / "pairs" / f"round-{step:05d}.jsonl", step, samples,
                                         np.asarray(scores.total, dtype=float), batch.pairs)
            if cfg.run.save_rollouts_every and done % cfg.run.save_rollouts_every == 0:
                self.save_rollouts(done, samples, scores)
            with timer("update"):
                self.engines_call("sleep")  # colocated on a GPU: the engines' memory is the trainer's now
                metrics = {**(self.policy.train(batch) if batch is not None else {}), **update_metrics}
            with timer("sync"):
                self.engines_call("wake_up")
                self.send_weights(done)
            with timer("log"):
                metrics.update(produced)
                metrics.update(scores.metrics())
                metrics["rollout/completion_tokens"] = float(np.mean([len(s.completion_ids) for s in samples]))
                metrics["rollout/truncated"] = float(np.mean([s.finish_reason == "length" for s in samples]))
                metrics["rollout/entropy"] = sampled_entropy(samples)
                metrics.update(self.mtp_acceptance("rollout"))
            if due(done, cfg.train.eval_every, cfg.train.steps):
                with timer("evaluate"):  # a phase of its own: the steps that evaluate are not slower to log
                    metrics.update(self.evaluate(done))
                    metrics.update(self.mtp_acceptance("eval"))
            metrics.update(timer.pop())
            if due(done, cfg.train.checkpoint_every, cfg.train.steps):
                began = time.perf_counter()
                self.save_checkpoint(done, metrics)
                metrics["time/checkpoint"] = time.perf_counter() - began
            self.logger.log(done, metrics)
            # the first reward as scored (the total is ~0 when every component is z-normalized)
            first = f"rewards/{cfg.rewards[0].key}/reward"
            bar.set_postfix({cfg.rewards[0].key: f"{metrics.get(first, float('nan')):.3f}",
                             **{key.split("/")[-1]: f"{metrics[key]:.3f}" for key in self.mode.plot_keys()[:1]
                                if key in metrics}})
        self.elapsed = time.time() - start
        self.close_pipeline()
        return self.finish()

    def mtp_acceptance(self, prefix: str) -> dict:
        """Verified decoding's acceptance in the engines since the last call (rollout.mtp_tokens > 0;
        model/mtp.py's AcceptanceMeter)."""
        if not self.cfg.rollout.mtp_tokens:
            return {}
        import ray
        from ray.exceptions import RayError

        try:
            counters = ray.get([w.spec_stats.remote() for w in self.workers])
        except RayError as e:  # a dead engine: the next generate replaces it; these counters are lost
            log.warning("MTP acceptance not read (%s)", e)
            return {}
        return self.mtp_meter.update(counters, prefix)

    def close_pipeline(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None

    def save_checkpoint(self, step: int, metrics: dict) -> None:
        with writing_checkpoint(self.run_dir, step, self.cfg.train.keep_checkpoints) as path:
            self.policy.save(str(path))
            self.update.save(path)
            write_trainer_state(path, step, metrics)  # the row travels with it: see write_trainer_state

    def finish(self) -> dict:
        with stop_on_write_error(self.run_dir, "the final weights"):
            final = self.policy.save_final(str(self.run_dir / "final"))
        last = self.logger.last
        steps = [r for r in self.logger.rows() if "time/step" in r]
        phases = sorted({k for r in steps for k in r if k.startswith("time/")})
        phase = {k: float(np.mean([r[k] for r in steps if k in r])) for k in phases}
        table = {
            "run": str(self.run_dir),
            "steps": self.cfg.train.steps,
            **self.mode.headline_rows(self.logger),
            # the total is ~0 when the rewards are z-normalized; each reward's own mean says more
            "mean reward (last step)": last("rewards/total"),
            **{f"mean {spec.key} (last step)": last(f"rewards/{spec.key}/reward") for spec in self.cfg.rewards},
            "logprob gap vLLM/trainer": last("train/logprob_gap"),
            **({"MTP tokens per decoding step (last step)": last("rollout/mtp_emitted")}
               if self.cfg.rollout.mtp_tokens else {}),
            "unscored samples (total)": int(sum(r.get("rewards/unscored", 0) for r in steps)),
            **{f"mean {k} (s)": round(v, 3) for k, v in phase.items()},
            "start-up time (s)": round(self.startup_s, 1),
            "train wall time (s)": round(self.elapsed, 1),
            "final weights": final,
            **self.mode.summary_rows(),
        }
        return self.logger.finish(table)

    def record_placement(self) -> None:
        """Which node each actor landed on, in <run>/placement.json (and the log): where a layout
        or a multi-node cluster put the run."""
        import ray

        ranks = self.policy.node_ids()
        actors = {("policy" if len(ranks) == 1 else f"policy rank {r}"): n for r, n in enumerate(ranks)}
        actors.update({f"engine {k}": n for k, n in enumerate(ray.get([w.node_id.remote() for w in self.workers]))})
        # what each computes in: run.cpu_kernels and the dtypes' auto decide it per machine
        precision = dict(zip(actors, [*self.policy.precisions(), *ray.get([w.precision.remote() for w in self.workers])]))
        record = {"layout": self.placement.layout, "bundles": self.placement.bundles,
                  "strategy": self.cfg.ray.placement_strategy, "actors": actors,
                  "nodes": sorted({n for n in actors.values()}), "precision": precision}
        with stop_on_write_error(self.run_dir, "placement.json"):
            (self.run_dir / "placement.json").write_text(json.dumps(record, indent=1) + "\n")
        log.info("placement (%s): %d actors on %d node(s); %s", self.placement.layout, len(actors), len(record["nodes"]),
                 ", ".join(f"{a} {p['dtype']} ({p['cpu_kernels']} kernels)" for a, p in precision.items()))

    def cleanup(self) -> None:
        """Leave Ray as the run found it: a local cluster the run started is shut down; on a Ray that
        was up before (`ray.address`, or one the caller started) the run's own actors are killed and
        its placement group released, so the next run there starts with every resource free."""
        import ray

        self.close_pipeline()
        if ray.is_initialized() and not getattr(self, "owns_ray", False):
            policy = getattr(self, "policy", None)
            for actor in [*(policy.actors if policy else []), *getattr(self, "workers", []),
                          *filter(None, [getattr(self, "reward", None)])]:
                try:
                    ray.kill(actor)  # a reward router's own workers die with it (Ray's ownership)
                except Exception as err:  # noqa: BLE001 - one that is already gone needs nothing more
                    log.debug("cleanup: %s", err)
        release(getattr(self, "placement", None))
        if ray.is_initialized() and getattr(self, "owns_ray", False):
            ray.shutdown()


def sampled_entropy(samples) -> float:
    """The policy's per-token entropy (nats) as the rollouts estimate it: the mean of -log p over the
    sampled tokens, an unbiased estimate of the sampling distribution's entropy (temperature and
    decoding constraint included) that costs no extra forward pass. Falling towards 0 = collapse."""
    logprobs = [lp for s in samples for lp in s.logprobs]
    return float(-np.mean(logprobs)) if logprobs else float("nan")


def run_online(cfg: RecipeConfig, resume: Optional[str] = None) -> dict:
    recipe = OnlineRecipe(cfg, resume)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()


def _seed_of(key: str) -> int:
    """An engine seed from a key, the same in any process (Python's hash() is salted per process)."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2  # room for the per-worker offset below 2**63
