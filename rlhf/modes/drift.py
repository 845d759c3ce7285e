"""Drift evaluation: does the policy stay in character as a dialogue grows long?

Held-out dialogues longer than the training episodes are played greedily and every reply is scored in
its context; the judge score and out-of-character rate are read by turn, since drift shows only as a
trend over turns. The metrics, `drift/step-<N>.json` and `drift.png` are described in docs/realtime.md.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np

from speechrl.rlhf.core.intervals import write_example_scores
from speechrl.rlhf.modes.episodes import Generate, run_episodes


def drift_curves(turns: list[int], scores: np.ndarray, threshold: float) -> dict[str, list[float]]:
    """Per turn index (0-based in `turns`; reported from 1): how many replies were scored, their
    mean judge score, and the share below `threshold`. NaN scores (unscored) are left out."""
    scores = np.asarray(scores, dtype=float)
    out: dict[str, list[float]] = {"turn": [], "scored": [], "judge": [], "ooc": []}
    for k in sorted(set(turns)):
        at = scores[[i for i, t in enumerate(turns) if t == k]]
        at = at[np.isfinite(at)]
        out["turn"].append(k + 1)
        out["scored"].append(int(at.size))
        out["judge"].append(float(at.mean()) if at.size else math.nan)
        out["ooc"].append(float((at < threshold).mean()) if at.size else math.nan)
    return out


def dialogue_of(reply_id: str) -> str:
    """A drift reply's dialogue: its id up to the turn ("<dialogue>/t<k>")."""
    return reply_id.rsplit("/t", 1)[0]


class DriftEvaluation:
    """The drift dialogues of a run, how to play and score them, and where the curves go."""

    def __init__(self, cfg, task, dialogues, speech, run_dir: Path):
        if not dialogues:
            raise ValueError("drift evaluation: no held-out dialogues (realtime.drift_dialogues_per_persona, "
                             "realtime.heldout_fraction)")
        self.cfg, self.task, self.dialogues, self.speech = cfg, task, list(dialogues), speech
        self.dir = Path(run_dir) / "drift"
        self.label = None  # the plot's name for these curves (default "step N"); eval names the checkpoint
        self.plot_path = Path(run_dir) / "drift.png"

    def evaluate(self, step: int, generate: Generate, score: Callable) -> dict:
        """Play the drift dialogues with `generate(requests)` (greedy), score them with
        `score(samples, requests) -> ScoreResult`; write the step's file and the plot; the metrics."""
        r = self.cfg.realtime
        requests, samples = run_episodes(self.task, self.dialogues, self.speech, r.drift_turns, generate, n=1)
        result = score(samples, requests)
        for field, name in (("drift_judge", r.drift_judge), ("drift_check", r.drift_check)):
            if name is not None and name not in result.rewards:
                raise KeyError(f"drift evaluation: no reward {name!r} among {sorted(result.rewards)} "
                               f"(realtime.{field})")
        judge = np.asarray(result.rewards[r.drift_judge], dtype=float)
        turns = [int(s.metadata["turn"]) for s in samples]
        curves = drift_curves(turns, judge, r.ooc_threshold)
        check = np.asarray(result.rewards[r.drift_check], dtype=float) if r.drift_check else None
        if check is not None:  # the independent check, by turn beside the judge
            curves["check"] = drift_curves(turns, check, r.ooc_threshold)["judge"]
        scored = judge[np.isfinite(judge)]
        metrics = {"drift/judge": float(scored.mean()) if scored.size else math.nan,
                   "drift/ooc_rate": float((scored < r.ooc_threshold).mean()) if scored.size else math.nan,
                   "drift/judge_last_turn": curves["judge"][-1]}
        for k, mean, ooc in zip(curves["turn"], curves["judge"], curves["ooc"]):
            metrics[f"drift/judge/turn_{k}"], metrics[f"drift/ooc/turn_{k}"] = mean, ooc
        if check is not None:
            checked = check[np.isfinite(check)]
            metrics["drift/check"] = float(checked.mean()) if checked.size else math.nan
            metrics["drift/check_last_turn"] = curves["check"][-1]
            metrics.update({f"drift/check/turn_{k}": v for k, v in zip(curves["turn"], curves["check"])})
        replies = [{"id": s.metadata["id"], "user": s.metadata["user_text"], "reply": self.task.parse(s.completion_ids).text,
                    "seconds": s.metadata["reply_seconds"], "judge": None if not np.isfinite(j) else float(j)}
                   for s, j in zip(samples, judge)]
        if check is not None:
            for reply, c in zip(replies, check):
                reply["check"] = None if not np.isfinite(c) else float(c)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"step-{step:05d}.json").write_text(json.dumps(
            {"step": step, **({"label": self.label} if self.label else {}), "threshold": r.ooc_threshold, "judge": r.drift_judge, **curves, "replies": replies},
            indent=1) + "\n")
        # per dialogue for paired intervals (`speechrl eval`): a dialogue's turns share a context, so its
        # lines (one a turn, "repeat" = the turn) are averaged before the dialogues are resampled
        write_example_scores(self.scores_path(step), (
            {"id": dialogue_of(r["id"]), "text": r["reply"], "repeat": turn, "drift/judge": r["judge"],
             **({"drift/check": r["check"]} if check is not None else {})} for r, turn in zip(replies, turns)))
        plot_drift(self.dir, self.plot_path)
        return metrics

    def scores_path(self, step: int) -> Path:
        return self.dir / "scores" / f"step-{step}.jsonl"


def plot_drift(folder: Path, out: Path) -> Path:
    """Judge score, out-of-character rate and (where logged) the independent check against the turn
    index, one line per `step-*.json`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("step-*.json"))]
    panels = ["judge", "ooc"] + (["check"] if runs and "check" in runs[-1] else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.7))
    for i, run in enumerate(runs):
        edge = i in (0, len(runs) - 1)
        label = run.get("label") or f"step {run['step']}" + ("" if len(runs) == 1 else " (before)" if i == 0
                                                             else " (after)" if i == len(runs) - 1 else "")
        style = dict(marker="o", linewidth=2.2 if edge else 0.8, alpha=1.0 if edge else 0.45, label=label)
        for ax, panel in zip(axes, panels):
            if panel in run:
                ax.plot(run["turn"], run[panel], **style)
    threshold = runs[-1]["threshold"] if runs else 0.5
    axes[0].axhline(threshold, color="grey", linestyle=":", linewidth=1)
    titles = ("judge score (mean)", f"out-of-character rate (score < {threshold:g})", "independent check (mean)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("turn")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(runs)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))  # room for the legend under the panels, clear of the curves
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
