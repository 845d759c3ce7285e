"""Online (iterative) DPO: each round samples k completions per prompt on the vLLM engines, ranks
them with the recipe's rewards, pairs each prompt's best with its worst, and makes a DPO step.

Everything but the update is the GRPO driver's (generate, score, sync, evaluation, checkpoints,
resume); the update is `PolicyWorker.dpo_update`, the same preference loss as offline DPO
(rlhf/dpo.py) against the run's starting weights. The pairs of every round are written to
`pairs/round-<step>.jsonl` in the run directory: TTS pairs in the preference format
(docs/preferences.md), so they can be inspected, annotated, or trained on offline (`algorithm: dpo`,
`dpo.data`); realtime pairs as one row per pair with the turn's context and both replies
(docs/realtime.md). In realtime mode a prompt is one turn of one episode, so a pair is two replies
to the same context.
"""
from __future__ import annotations

import json
import logging
from typing import Optional

import numpy as np

from speechrl.rlhf.trainers.grpo import GRPORecipe, run_grpo

log = logging.getLogger(__name__)


def best_worst_pairs(total: np.ndarray, valid: np.ndarray, groups: np.ndarray, min_gap: float = 0.0
                     ) -> list[tuple[int, int]]:
    """(chosen, rejected) sample indices: per group, the highest- and lowest-scored valid samples,
    when their rewards differ by more than `min_gap` (ties teach nothing). First index wins ties."""
    pairs = []
    for g in np.unique(groups):
        members = [i for i in np.flatnonzero(groups == g) if valid[i] and np.isfinite(total[i])]
        if len(members) < 2:
            continue
        scores = total[members]
        best, worst = members[int(np.argmax(scores))], members[int(np.argmin(scores))]
        if total[best] - total[worst] > min_gap:
            pairs.append((best, worst))
    return pairs


class OnlineDPORecipe(GRPORecipe):
    def advantages(self, samples, scores, requests):
        """Not advantages here: the step's (chosen, rejected) pairs, logged and saved."""
        groups = np.array([s.prompt_index for s in samples])
        total = np.asarray(scores.total, dtype=float)
        pairs = best_worst_pairs(total, np.asarray(scores.valid), groups, self.cfg.dpo.min_reward_gap)
        self._save_pairs(samples, total, pairs)
        return pairs

    def update(self, samples, requests, pairs) -> dict:
        import ray

        if not pairs:  # every group tied: nothing to prefer this round
            log.warning("no preference pairs this round (all groups tied or unscored); no update")
            return {"train/pairs": 0}
        metrics = ray.get(self.policy.dpo_update.remote(
            [samples[c].prompt_ids for c, _ in pairs], [samples[c].completion_ids for c, _ in pairs],
            [samples[r].completion_ids for _, r in pairs], [requests[samples[c].prompt_index].audio for c, _ in pairs]))
        metrics["train/pairs"] = len(pairs)
        return metrics

    def _save_pairs(self, samples, total: np.ndarray, pairs: list[tuple[int, int]]) -> None:
        from speechrl.data.preferences import PreferencePair, Speech, write_preferences

        if not pairs:
            return
        step = self.step
        path = self.run_dir / "pairs" / f"round-{step:05d}.jsonl"
        if self.cfg.mode == "realtime":
            self._save_dialogue_pairs(path, samples, total, pairs)
            return
        rows = [PreferencePair(
            id=f"round{step}-{samples[c].metadata.get('id', c)}", text=samples[c].metadata["text"],
            chosen=Speech(codec_ids=tuple(self.task.codec_ids(samples[c].completion_ids))),
            rejected=Speech(codec_ids=tuple(self.task.codec_ids(samples[r].completion_ids))),
            annotator="rewards:" + "+".join(spec.key for spec in self.cfg.rewards),
            reason=f"total reward {total[c]:.3f} vs {total[r]:.3f}")
            for c, r in pairs if self.task.codec_ids(samples[c].completion_ids)
            and self.task.codec_ids(samples[r].completion_ids)]
        write_preferences(path, rows)

    def _save_dialogue_pairs(self, path, samples, total: np.ndarray, pairs: list[tuple[int, int]]) -> None:
        """Realtime pairs: the turn's context (its id, persona, history, user turn) and both replies."""
        def reply(i: int) -> dict:
            parsed = self.task.parse(samples[i].completion_ids)
            return {"text": parsed.text, "codec_ids": [int(c) for c in parsed.codec_ids], "reward": float(total[i])}

        rows = [{key: samples[c].metadata[key] for key in ("id", "persona", "history", "user_text")}
                | {"chosen": reply(c), "rejected": reply(r)} for c, r in pairs]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def run_online_dpo(cfg, resume: Optional[str] = None) -> dict:
    return run_grpo(cfg, resume, OnlineDPORecipe)
