"""DPO: offline from a preference dataset (each mode reads its own: Mode.preference_rows), and the loss
both DPO paths share.

Offline, against a frozen reference (the starting weights), plus `dpo.sft_weight` times the chosen NLL;
online DPO (algos/updates.py) calls the same `preference_loss`. Not TRL's DPOTrainer: its batches are
text-only with its own tokenization, ours token-in/token-out rows whose prompt runs once per pair.
"""
from __future__ import annotations

import logging

import torch

from speechrl.rlhf.algos import PREFERENCE_LOSSES
from speechrl.rlhf.algos.preference import sft_term
from speechrl.rlhf.core.config import RecipeError
from speechrl.rlhf.model.logprobs import build_token_batch, token_logprobs
from speechrl.rlhf.modes.base import batch_indices
from speechrl.rlhf.trainers.sft import SFTRecipe

log = logging.getLogger(__name__)


def preference_batch(processor, prompt_ids: list[list[int]], chosen: list[list[int]], rejected: list[list[int]],
                     pad_id: int, audios: list | None = None):
    """One token batch of 2B rows: the B chosen completions, then the B rejected ones, each after
    its pair's prompt, which both rows share and run once (text-only prompts: by equal prompt ids;
    with `audios`, each pair's clip: by the clip object)."""
    prompts = list(prompt_ids) + list(prompt_ids)
    clips = [None] * len(prompts) if audios is None else list(audios) + list(audios)
    return build_token_batch(processor, prompts, list(chosen) + list(rejected), clips, pad_id)


def preference_loss(model, reference, batch, num_pairs: int, dpo_cfg, allowed: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean preference loss over the pairs of a `preference_batch`, and its metrics."""
    mask = batch.completion_mask
    logp = token_logprobs(model, batch, 1.0, allowed)
    with torch.no_grad():
        ref_logp = token_logprobs(reference, batch, 1.0, allowed)
    tokens = mask.sum(-1).clamp(min=1)
    seq, ref_seq = (logp * mask).sum(-1), (ref_logp * mask).sum(-1)
    if dpo_cfg.loss == "ipo":  # IPO regresses per-token mean log-ratios (see algos/preference.py)
        seq, ref_seq = seq / tokens, ref_seq / tokens
    c, r = slice(0, num_pairs), slice(num_pairs, 2 * num_pairs)
    losses, metrics = PREFERENCE_LOSSES.get(dpo_cfg.loss)(seq[c], seq[r], ref_seq[c], ref_seq[r],
                                                         beta=dpo_cfg.beta, label_smoothing=dpo_cfg.label_smoothing)
    loss = losses.mean()
    if dpo_cfg.sft_weight:
        nll = sft_term(logp[c], mask[c]).mean()
        loss = loss + dpo_cfg.sft_weight * nll
        metrics["chosen_nll"] = nll.detach()
    metrics["loss"] = loss.detach()
    return loss, {k: float(v) for k, v in metrics.items()}


class DPORecipe(SFTRecipe):
    """Offline DPO; everything but the batches and the loss is SFT's (evaluation, checkpoints, resume)."""

    with_reference = True
    plot_keys = ["train/loss", "train/reward_margin", "train/reward_accuracy"]

    def setup(self) -> None:
        from speechrl.rlhf.model.logprobs import vocab_mask

        if not self.cfg.dpo.data:  # checked here, not at load: the shipped recipe is completed on the command line
            raise RecipeError(f"offline DPO needs `dpo.data`, a preference file (docs/preferences.md): speechrl train "
                              f"{self.cfg.mode}/dpo dpo.data=pairs.jsonl run.init_from=<sft run>/final. Online DPO, "
                              f"which makes its own pairs, is {self.cfg.mode}/online_dpo")
        super().setup()
        # the mode reads its own format into token rows (TTS: text -> codec ids; ASR: clip -> transcripts)
        self.pairs, self.pairs_read = self.mode.preference_rows(self.cfg.dpo.data)
        summary = self.pairs_read
        if not self.pairs:
            raise ValueError(f"dpo.data={self.cfg.dpo.data}: no usable preference pairs ({summary}); "
                             "see docs/preferences.md for the format")
        vocab = self.backbone.model.get_output_embeddings().weight.shape[0]
        self.allowed = vocab_mask(self.task.allowed_ids, vocab)

    def _batch(self, step: int):
        idx = batch_indices(len(self.pairs), self.cfg.train.batch_size, step, self.cfg.seed)
        rows = [self.pairs[int(i)] for i in idx]
        audios = None if rows[0].audio is None else [r.audio for r in rows]
        return preference_batch(self.backbone.processor, [r.prompt_ids for r in rows], [r.chosen_ids for r in rows],
                                [r.rejected_ids for r in rows], self.backbone.tokenizer.pad_token_id,
                                audios).to(self.policy.device), len(rows)

    def step_loss(self, step: int):
        batch, pairs = self._batch(step)
        return preference_loss(self.model, self.reference, batch, pairs, self.cfg.dpo, self.allowed)

    def summary_rows(self) -> dict:
        last = self.logger.last
        return {"preference pairs": len(self.pairs), "preference data": self.pairs_read,
                "final reward accuracy": last("train/reward_accuracy"),
                "final reward margin": last("train/reward_margin")}


def run_dpo(cfg, resume=None) -> dict:
    recipe = DPORecipe(cfg, resume)
    recipe.setup()
    return recipe.train()

