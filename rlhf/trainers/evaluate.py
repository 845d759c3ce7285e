"""Held-out metrics of a saved checkpoint, as a run measures them at each evaluation: in this process
(a transformers model, as SFT evaluates), or on vLLM engines serving the checkpoint (as an RL run
evaluates: realtime drift). `speechrl eval` and a schedule's interference matrix both call these."""
from __future__ import annotations

from pathlib import Path

from speechrl.rlhf.core.config import RecipeConfig


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
