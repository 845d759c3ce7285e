"""Supervised fine-tuning: (audio -> transcript) pairs, next-token loss on the transcript.

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
import torch
from tqdm import tqdm

from speechrl.data.prompts import render_prompt
from speechrl.rlhf import assets
from speechrl.rlhf.backbone import load_backbone, save_backbone
from speechrl.rlhf.config import RecipeConfig
from speechrl.rlhf.evaluate import evaluate_asr
from speechrl.rlhf.policy import (Optimizer, apply_lora, build_token_batch, exportable_model, load_policy,
                                  maybe_set_threads, prompt_ids_for, rng_state, save_policy, seed_everything,
                                  set_rng_state, sft_loss)
from speechrl.rlhf.run_dir import (RunLogger, find_resume_dir, latest_checkpoint, new_run_dir, prune_checkpoints,
                                   write_trainer_state)

log = logging.getLogger(__name__)


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The examples of optimizer step `step`: epoch-wise permutations seeded by (seed, epoch)."""
    per_epoch = max(1, num_examples // batch_size)
    epoch, offset = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return perm[offset * batch_size : (offset + 1) * batch_size]


class SFTRecipe:
    def __init__(self, cfg: RecipeConfig, resume: Optional[str] = None):
        self.cfg = cfg
        self.resume = resume

    def setup(self) -> None:
        cfg = self.cfg
        maybe_set_threads(cfg.train.torch_threads)
        seed_everything(cfg.seed)
        self.run_dir = find_resume_dir(cfg, self.resume) if self.resume else new_run_dir(cfg)
        self.start_step = 0
        checkpoint = latest_checkpoint(self.run_dir) if self.resume else None
        base = assets.backbone_path(cfg)
        self.backbone = load_backbone(checkpoint / "model" if checkpoint and not cfg.model.lora.enabled else base)
        self.train_set, self.eval_set = assets.load_datasets(cfg, self.backbone.max_audio_seconds)
        model = self.backbone.model
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if cfg.model.lora.enabled:
            model = apply_lora(model, cfg.model.lora)
        model.train()
        self.optimizer = Optimizer(model, cfg.train, cfg.train.steps)
        self.model = self.optimizer.model
        self.logger = RunLogger(self.run_dir, cfg, plot_keys=["train/loss", "eval/wer", "eval/cer", "lr"])
        self.prompt = render_prompt(self.backbone.processor, cfg.mode)
        self._prompt_ids: dict[str, list[int]] = {}
        if checkpoint:
            self._restore(checkpoint)
        log.info("run directory: %s", self.run_dir)

    def _restore(self, checkpoint: Path) -> None:
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        load_policy(self.model, self.optimizer, checkpoint, self.cfg.model.lora.enabled)
        set_rng_state(state["rng"])
        self.start_step = state["step"]
        self.logger.truncate_after(self.start_step)
        print(f"resumed {self.run_dir} from {checkpoint.name} (step {self.start_step})")

    def _batch(self, step: int):
        idx = batch_indices(len(self.train_set), self.cfg.train.batch_size, step, self.cfg.seed)
        items = [self.train_set[int(i)] for i in idx]
        tok, proc = self.backbone.tokenizer, self.backbone.processor
        prompts, completions = [], []
        for ex, audio in items:
            # prompt ids depend on the clip's length only through the audio placeholder count; cache per example
            if ex.id not in self._prompt_ids:
                self._prompt_ids[ex.id] = prompt_ids_for(proc, self.prompt, audio)
            prompts.append(self._prompt_ids[ex.id])
            completions.append(tok(ex.text, add_special_tokens=False)["input_ids"] + [self.backbone.eos_token_id])
        return build_token_batch(proc, prompts, completions, [a for _, a in items], tok.pad_token_id)

    def evaluate(self) -> dict:
        model = exportable_model(self.model) if self.cfg.model.lora.enabled else self.backbone.model
        result = evaluate_asr(model, self.backbone.processor, self.eval_set,
                              max_examples=self.cfg.data.max_eval_examples,
                              max_new_tokens=self.cfg.eval_max_new_tokens)
        for ref, hyp in result.pop("examples"):
            log.info("eval  ref: %s\n      hyp: %s", ref, hyp)
        return result

    def train(self) -> dict:
        cfg = self.cfg.train
        first_eval = self.evaluate() if self.start_step == 0 else None
        if first_eval:
            self.logger.log(0, first_eval)
        self.initial_eval = first_eval or next((r for r in self.logger.rows() if "eval/wer" in r), {})
        start, losses = time.time(), []
        bar = tqdm(range(self.start_step, cfg.steps), initial=self.start_step, total=cfg.steps, desc="sft",
                   unit="step", dynamic_ncols=True)
        for step in bar:
            loss = sft_loss(self.model, self._batch(step))
            self.optimizer.backward(loss)
            stats = self.optimizer.step()
            losses.append(loss.item())
            done = step + 1
            metrics = {}
            if done % cfg.log_every == 0 or done == cfg.steps:
                metrics = {"train/loss": float(np.mean(losses)), **stats}
                losses = []
            if done % cfg.eval_every == 0 or done == cfg.steps:
                metrics.update(self.evaluate())
            if metrics:
                self.logger.log(done, metrics)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in metrics.items()
                                 if k in ("train/loss", "eval/wer")})
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                self.save_checkpoint(done)
        self.elapsed = time.time() - start
        return self.finish()

    def save_checkpoint(self, step: int) -> Path:
        path = self.run_dir / "checkpoints" / f"step-{step}"
        save_policy(self.model, self.backbone.processor, self.optimizer, path, self.cfg.model.lora.enabled)
        write_trainer_state(path, {"step": step, "rng": rng_state()})
        prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        return path

    def finish(self) -> dict:
        import resource

        final = save_backbone(exportable_model(self.model), self.backbone.processor, self.run_dir / "final")
        rows = self.logger.rows()
        last_eval = next((r for r in reversed(rows) if "eval/wer" in r), {})
        data = self.train_set.summary()
        table = {
            "run": str(self.run_dir),
            "steps": self.cfg.train.steps,
            "train examples (kept/bad)": f"{data['kept']}/{data['bad']}",
            "eval examples": min(len(self.eval_set), self.cfg.data.max_eval_examples),
            "held-out WER before": self.initial_eval.get("eval/wer", float("nan")),
            "held-out WER after": last_eval.get("eval/wer", float("nan")),
            "held-out CER after": last_eval.get("eval/cer", float("nan")),
            "final loss": next((r["train/loss"] for r in reversed(rows) if "train/loss" in r), float("nan")),
            "train wall time (s)": round(self.elapsed, 1),
            "peak RSS (MiB)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "final weights": str(final),
        }
        self.logger.plot()
        print(self.logger.summary(table))
        self.logger.close()
        return table


def run_sft(cfg: RecipeConfig, resume: Optional[str] = None) -> dict:
    recipe = SFTRecipe(cfg, resume)
    recipe.setup()
    return recipe.train()
