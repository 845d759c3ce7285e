"""Supervised fine-tuning: next-token loss on the mode's reference completions (a transcript, codec
tokens, or a spoken reply), built by the mode's task from its training examples.

Also the warm start of every RL recipe. Resumable: the data order is a pure function of
(seed, step), so restoring weights, optimizer, scheduler and RNG at step N continues the
exact run an uninterrupted job would have made.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from speechrl.rlhf.core.config import RecipeConfig
from speechrl.rlhf.core.devices import peak_memory_gib, peak_rss_mib
from speechrl.rlhf.model.logprobs import build_token_batch
from speechrl.rlhf.modes import get_mode
from speechrl.rlhf.modes.base import batch_indices
from speechrl.rlhf.trainers.judges import prebuild_judges
from speechrl.rlhf.model.policy import build_policy, exportable_model, save_model, save_policy
from speechrl.rlhf.core.seeding import seed_everything, set_threads
from speechrl.rlhf.core.run_dir import (RunLogger, due, find_resume_dir, latest_checkpoint, new_run_dir, resume_run,
                                   stop_on_write_error, write_trainer_state, writing_checkpoint)

log = logging.getLogger(__name__)


class SFTRecipe:
    with_reference = False  # DPO (a subclass) keeps the starting weights as its reference
    plot_keys = ["train/loss"]

    def __init__(self, cfg: RecipeConfig, resume: Optional[str] = None):
        self.cfg = cfg
        self.resume = resume

    def open_run(self) -> Optional[Path]:
        """Threads, seeds and the run directory (new, or the one resumed); the checkpoint to resume from."""
        set_threads(self.cfg.train.torch_threads)
        seed_everything(self.cfg.seed)
        self.run_dir = find_resume_dir(self.cfg, self.resume) if self.resume else new_run_dir(self.cfg)
        return latest_checkpoint(self.run_dir) if self.resume else None

    def setup(self) -> None:
        cfg = self.cfg
        checkpoint = self.open_run()
        self.mode = get_mode(cfg)
        policy = build_policy(cfg, self.mode.backbone_path(), checkpoint, with_reference=self.with_reference)
        self.backbone, self.model, self.optimizer = policy.backbone, policy.model, policy.optimizer
        self.reference, self.policy = policy.reference, policy
        self.train_set, self.eval_set = self.mode.datasets(self.backbone.max_audio_seconds)
        self.logger = RunLogger(self.run_dir, cfg, plot_keys=[*self.plot_keys, *self.mode.plot_keys(), "lr"])
        self.task = self.mode.setup_task(self.backbone.processor)
        if self.mode.offline_evaluation_scores:
            prebuild_judges(cfg)  # the evaluation's rewards run in this process
        self.start_step = resume_run(checkpoint, self.logger) if checkpoint else 0
        log.info("run directory: %s", self.run_dir)

    def _batch(self, step: int):
        idx = batch_indices(len(self.train_set), self.cfg.train.batch_size, step, self.cfg.seed)
        items = [self.train_set[int(i)] for i in idx]
        rows = [self.task.sft_example(ex, audio, self.train_set) for ex, audio in items]
        return build_token_batch(self.backbone.processor, [r[0] for r in rows], [r[1] for r in rows],
                                 [r[2] for r in rows], self.backbone.tokenizer.pad_token_id).to(self.policy.device)

    def evaluate(self, step: int) -> dict:
        return self.mode.evaluate_offline(step, exportable_model(self.model), self.backbone.processor, self.eval_set,
                                          self.run_dir, self.logger)

    def train(self) -> dict:
        cfg = self.cfg.train
        if self.start_step == 0 and (baseline := self.evaluate(0)):
            self.logger.log(0, baseline)  # the untrained baseline: "WER before" in the summary
        start, history = time.time(), []
        bar = tqdm(range(self.start_step, cfg.steps), initial=self.start_step, total=cfg.steps,
                   desc=self.cfg.algorithm, unit="step", dynamic_ncols=True)
        for step in bar:
            with self.policy.autocast():
                loss, step_metrics = self.step_loss(step)
            self.optimizer.backward(loss)
            stats = self.optimizer.step()
            history.append({"loss": loss.item(), **step_metrics})
            done = step + 1
            metrics = {}
            if due(done, cfg.log_every, cfg.steps):
                keys = dict.fromkeys(k for h in history for k in h)  # a mixture's modes log different terms
                metrics = {f"train/{k}": float(np.mean([h[k] for h in history if k in h])) for k in keys}
                metrics.update(stats, **peak_memory_gib(self.policy.device))
                history = []
            if due(done, cfg.eval_every, cfg.steps):
                metrics.update(self.evaluate(done))
            if metrics:
                self.logger.log(done, metrics)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in metrics.items()
                                 if k in ("train/loss", self.headline_key)})
            if due(done, cfg.checkpoint_every, cfg.steps):
                self.save_checkpoint(done)
        self.elapsed = time.time() - start
        return self.finish()

    @property
    def headline_key(self) -> str:
        """The metric the progress bar shows beside the loss."""
        return self.mode.headlines[0][1]

    def step_loss(self, step: int) -> tuple:
        """The loss of optimizer step `step` and its metrics (floats, logged as train/<name>)."""
        return self.mode.sft_loss(self.model, self._batch(step), self.policy.mtp)

    def summary_rows(self) -> dict:
        """Rows a subclass adds to the summary table."""
        return {}

    def data_rows(self) -> dict:
        """The summary's rows on the data and the held-out metrics before and after."""
        data = self.train_set.summary()
        return {"train examples (kept/bad)": f"{data['kept']}/{data['bad']}",
                "eval examples": min(len(self.eval_set), self.cfg.data.max_eval_examples),
                **self.mode.headline_rows(self.logger)}

    def save_checkpoint(self, step: int) -> Path:
        with writing_checkpoint(self.run_dir, step, self.cfg.train.keep_checkpoints) as path:
            save_policy(self.model, self.backbone.processor, self.optimizer, path, self.cfg.model.lora.enabled,
                        self.policy.mtp)
            write_trainer_state(path, step)
        return path

    def finish(self) -> dict:
        with stop_on_write_error(self.run_dir, "the final weights"):
            final = save_model(self.model, self.backbone.processor, self.run_dir / "final", self.policy.mtp)
        table = {
            "run": str(self.run_dir),
            "steps": self.cfg.train.steps,
            **self.data_rows(),
            "final loss": self.logger.last("train/loss"),
            **self.summary_rows(),
            "train wall time (s)": round(self.elapsed, 1),
            "peak RSS (MiB)": peak_rss_mib(),
            "final weights": str(final),
        }
        return self.logger.finish(table)


def run_sft(cfg: RecipeConfig, resume: Optional[str] = None) -> dict:
    recipe = SFTRecipe(cfg, resume)
    recipe.setup()
    return recipe.train()
