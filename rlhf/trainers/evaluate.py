"""Held-out metrics of a saved checkpoint, as a run measures them at each evaluation: in this process
(a transformers model, as SFT evaluates), or on vLLM engines serving the checkpoint (as an RL run
evaluates: realtime drift). `speechrl eval` and a schedule's interference matrix both call these."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.stats import bootstrap

from speechrl.rlhf.core.config import RecipeConfig

RESAMPLES = 2000  # bootstrap draws of the held-out examples for a paired interval


def evaluate_on_engines(cfg: RecipeConfig, checkpoint: Path, out_dir: Path):
    """(mode, metrics) of `checkpoint` on engines serving it; the mode's outputs go to `out_dir`."""
    from speechrl.rlhf.trainers.online import OnlineRecipe

    cfg.run.init_from = str(checkpoint)
    recipe = OnlineRecipe(cfg)
    try:
        recipe.setup_evaluation(out_dir)
        recipe.mode.label_evaluation("/".join(Path(checkpoint).resolve().parts[-2:]))  # e.g. <run>/final
        metrics = recipe.evaluate(0)
    finally:
        recipe.cleanup()
    return recipe.mode, metrics


def evaluate_in_process(cfg: RecipeConfig, checkpoint: Path, out_dir: Path):
    """(mode, metrics, backbone) of `checkpoint` loaded here; the mode's outputs go to `out_dir`."""
    from torch.utils.tensorboard import SummaryWriter

    from speechrl.rlhf.model.backbone import load_backbone
    from speechrl.rlhf.modes import get_mode
    from speechrl.rlhf.trainers.judges import prebuild_judges

    class _Writer:  # evaluations that write TensorBoard audio do it through a run logger's `tb`
        tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    mode, backbone = get_mode(cfg), load_backbone(checkpoint)
    _, held = mode.datasets(backbone.max_audio_seconds)
    mode.setup_task(backbone.processor)
    if mode.offline_evaluation_scores:  # realtime's reply loss needs no judge (its trained one is a long build)
        prebuild_judges(cfg)
    metrics = mode.evaluate_offline(0, backbone.model, backbone.processor, held, Path(out_dir), _Writer)
    _Writer.tb.close()
    return mode, metrics, backbone


def comparison_table(headlines: list[tuple[str, str]], results: list[tuple[str, dict]]) -> str:
    """The mode's headline metrics (label, key) of each (checkpoint, metrics), one row a checkpoint,
    and each one's change from the first checkpoint's; headlines no checkpoint has are left out."""
    shown = [(label, key, max(len(label), 9)) for label, key in headlines
             if any(key in metrics for _, metrics in results)]
    if not shown:
        return "(none of the mode's headline metrics was measured)"
    first = results[0][1]
    width = max(len("checkpoint"), *(len(name) for name, _ in results))
    lines = ["  ".join([f"{'checkpoint':<{width}}", *(f"{label:>{w}}  {'change':>7}" for label, _, w in shown)])]
    for k, (name, metrics) in enumerate(results):
        cells = [f"{name:<{width}}"]
        for _, key, w in shown:
            value = metrics.get(key, float("nan"))
            change = "" if k == 0 else f"{value - first.get(key, float('nan')):+.3f}"
            cells.append(f"{value:>{w}.3f}  {change:>7}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def example_table(path: Path) -> dict[str, dict[str, float]]:
    """metric key -> example id -> its mean over the file's lines for that id (unscored left out), from
    a per-example scores file ({"id", "text", "repeat", <metric key>: value or null}), read once."""
    values: dict[str, dict[str, list[float]]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                example = str(row["id"])
                for key, value in row.items():
                    if key not in ("id", "text", "repeat") and value is not None:
                        values.setdefault(key, {}).setdefault(example, []).append(float(value))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}, line {number}: not a per-example score ({type(e).__name__}: {e}); "
                                 "evaluate that checkpoint again to rewrite the file") from None
    return {key: {k: float(np.mean(v)) for k, v in by_id.items()} for key, by_id in values.items()}


def example_means(path: Path, key: str) -> dict[str, float]:
    """Each example id's mean of `key` in a per-example scores file (unscored left out)."""
    return example_table(path).get(key, {})


def paired_intervals(headlines: list[tuple[str, str]], files: list[tuple[str, Path]], seed: int = 0) -> str:
    """Each checkpoint's change from the first in every headline its per-example scores file has, with
    a 95 % bootstrap interval: the held-out examples are resampled (each example's mean over its
    repeats), so the interval holds the draws' noise and the choice of examples both. The change is
    the mean of per-example changes over the examples both scored."""
    rng = np.random.default_rng(seed)
    tables = [example_table(path) for _, path in files]  # each file read once, not once per headline
    lines = []
    for label, key in headlines:
        base = tables[0].get(key, {})
        for (name, _), table in zip(files[1:], tables[1:]):
            other = table.get(key, {})
            ids = sorted(set(base) & set(other))
            if not ids:
                continue
            diff = np.array([other[i] - base[i] for i in ids])
            low, high = bootstrap((diff,), np.mean, n_resamples=RESAMPLES, method="percentile",
                                  rng=rng).confidence_interval
            beyond = "" if low <= 0 <= high else "  (beyond the noise)"
            lines.append(f"{label}, {name}: {diff.mean():+.3f}  95% interval [{low:+.3f}, {high:+.3f}] "
                         f"over {len(ids)} examples{beyond}")
    return "\n".join(lines) or "(no per-example scores of the mode's headline metrics)"
