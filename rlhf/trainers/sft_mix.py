"""SFT on a mixture of modes: one backbone, each step's batch from one mode, drawn by the mixture's shares.

Each mode's own task builds its batch (its prompts, its reference completions) and its own loss is
the step's loss, so the modes share the weights and the optimizer and nothing else. The draws are a
pure function of (seed, step) and each mode walks its own data in epochs, so a resumed run makes the
same draws as an uninterrupted one. The run does not evaluate: the schedule that runs it measures
every mode's held-out metric after the stage (trainers/schedule.py, the interference matrix).
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from speechrl.rlhf.core.config import RecipeConfig, RecipeError
from speechrl.rlhf.core.run_dir import RunLogger, resume_run
from speechrl.rlhf.model.logprobs import build_token_batch
from speechrl.rlhf.model.policy import build_policy
from speechrl.rlhf.modes import get_mode
from speechrl.rlhf.modes.base import batch_indices
from speechrl.rlhf.trainers.sft import SFTRecipe

log = logging.getLogger(__name__)


def mixture_draws(shares: list[float], steps: int, seed: int) -> np.ndarray:
    """The part each step trains on, drawn by `shares` (normalized) from a generator seeded by (seed,
    step): a step's draw never depends on train.steps, so a run extended on resume keeps its past."""
    p = np.asarray(shares, dtype=float)
    return np.array([np.random.default_rng([seed, 1, step]).choice(len(p), p=p / p.sum()) for step in range(steps)],
                    dtype=int)


class MixedSFTRecipe(SFTRecipe):
    """`parts`: each mode's SFT recipe (its data, task and batch size), with its share of the steps.
    The run's own settings (steps, optimizer, schedule, run directory) are the first part's."""

    plot_keys = ["train/loss"]

    def __init__(self, parts: list[tuple[RecipeConfig, float]], resume: Optional[str] = None):
        super().__init__(parts[0][0], resume)
        self.parts = [cfg for cfg, _ in parts]
        self.shares = [share for _, share in parts]

    def setup(self) -> None:
        cfg = self.cfg
        checkpoint = self.open_run()
        self.modes = [get_mode(part) for part in self.parts]
        paths = {str(mode.backbone_path()) for mode in self.modes}
        if len(paths) > 1:
            raise RecipeError("an SFT mixture trains one backbone, but its recipes start from "
                              f"{len(paths)}: {', '.join(sorted(paths))}. Set model.tiny.texts=all_modes "
                              "(and one model.tiny shape) for all of them, or one run.init_from")
        self.mode = self.modes[0]
        policy = build_policy(cfg, paths.pop(), checkpoint)
        self.backbone, self.model, self.optimizer, self.policy = policy.backbone, policy.model, policy.optimizer, policy
        self.sets = [mode.datasets(self.backbone.max_audio_seconds)[0] for mode in self.modes]
        self.train_set = self.sets[0]
        self.tasks = [mode.setup_task(self.backbone.processor) for mode in self.modes]
        self.draws = mixture_draws(self.shares, cfg.train.steps, cfg.seed)
        self.logger = RunLogger(self.run_dir, cfg, plot_keys=[*self.plot_keys, "lr"])
        self.start_step = resume_run(checkpoint, self.logger) if checkpoint else 0
        log.info("run directory: %s; mixture %s", self.run_dir,
                 ", ".join(f"{m.name} {s / sum(self.shares):.2f}" for m, s in zip(self.modes, self.shares)))

    def step_loss(self, step: int) -> tuple:
        k = int(self.draws[step])
        mode, task, data, part = self.modes[k], self.tasks[k], self.sets[k], self.parts[k]
        # this part's own epochs: the how-many-th time it is drawn, not the global step, picks its batch
        idx = batch_indices(len(data), part.train.batch_size, int((self.draws[:step] == k).sum()), part.seed)
        rows = [task.sft_example(ex, audio, data) for ex, audio in (data[int(i)] for i in idx)]
        batch = build_token_batch(self.backbone.processor, [r[0] for r in rows], [r[1] for r in rows],
                                  [r[2] for r in rows], self.backbone.tokenizer.pad_token_id).to(self.policy.device)
        loss, metrics = mode.sft_loss(self.model, batch, self.policy.mtp)
        return loss, {**metrics, f"{mode.name}_loss": loss.item()}

    @property
    def headline_key(self) -> str:
        return "train/loss"

    def evaluate(self, step: int) -> dict:
        return {}  # every mode's held-out metric is the schedule's, after the stage

    def data_rows(self) -> dict:
        rows = {}
        for k, (mode, data, share) in enumerate(zip(self.modes, self.sets, self.shares)):
            summary = data.summary()
            rows[f"{mode.name}: share, steps, examples kept/bad"] = (
                f"{share / sum(self.shares):.2f}, {int((self.draws == k).sum())}, {summary['kept']}/{summary['bad']}")
            rows[f"{mode.name}: final loss"] = self.logger.last(f"train/{mode.name}_loss")
        return rows


def run_sft_mix(parts: list[tuple[RecipeConfig, float]], resume: Optional[str] = None) -> dict:
    recipe = MixedSFTRecipe(parts, resume)
    recipe.setup()
    return recipe.train()
