"""A schedule run: one backbone through a list of stages (core/schedule.py), and the interference matrix.

The schedule's run directory holds everything:

    <name>-<timestamp>/
      schedule.yaml        the schedule as loaded (shared overrides included)
      state.json           each finished stage's final weights: what --resume skips
      stages/NN-<name>/    each stage's own run directory (an RL mix: one per turn, NN-<name>-rR-<mode>)
      interference/<row>/  each evaluation's outputs (TTS samples, drift curves)
      interference.json    every evaluation's metrics at the start and after every stage
      interference.png     the same, one panel per metric

Each stage starts from the last one's final weights, so the run is one checkpoint chain. A stopped
schedule resumes with `--resume <dir>`: finished stages are skipped, the stage it stopped in
continues from its last checkpoint (each trainer's own resume), missing evaluations are made.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import yaml

from speechrl.rlhf.core.config import RecipeConfig, load_recipe
from speechrl.rlhf.core.run_dir import latest_checkpoint
from speechrl.rlhf.core.schedule import ScheduleConfig, StageConfig, stage_recipe, stage_recipes
from speechrl.rlhf.modes import get_mode

log = logging.getLogger(__name__)

STATE, MATRIX, PLOT = "state.json", "interference.json", "interference.png"


@dataclass
class Unit:
    """One run of a stage: the whole stage, or one turn of an RL mix."""
    name: str  # its run directory under stages/
    stage: StageConfig
    recipes: dict[str, float]  # recipe -> share (an SFT mix: several in one run)
    steps: int  # 0 = the recipe's own train.steps
    last_of_stage: bool  # the interference matrix gets a row after it


def units(schedule: ScheduleConfig) -> list[Unit]:
    """The runs the schedule makes, in order: an SFT mix is one run; an RL mix takes turns `rounds`
    times, each recipe for its share of the stage's steps in each round (at least one step)."""
    out = []
    for i, stage in enumerate(schedule.stages, 1):
        prefix, shares = f"{i:02d}-{stage.name}", stage_recipes(stage)
        algorithms = {stage_recipe(schedule, r, stage).algorithm for r in shares}
        if len(shares) == 1 or algorithms == {"sft"}:
            out.append(Unit(prefix, stage, shares, stage.steps, True))
            continue
        total = stage.steps or stage_recipe(schedule, next(iter(shares)), stage).train.steps
        turns = [(r, recipe) for r in range(1, stage.rounds + 1) for recipe in shares]
        for k, (r, recipe) in enumerate(turns):
            steps = max(1, round(total * shares[recipe] / stage.rounds))
            mode = stage_recipe(schedule, recipe, stage).mode
            out.append(Unit(f"{prefix}-r{r}-{mode}", stage, {recipe: 1.0}, steps, k == len(turns) - 1))
    return out


class ScheduleRun:
    def __init__(self, schedule: ScheduleConfig, resume: Optional[str] = None, run_name: Optional[str] = None):
        self.schedule = schedule
        if resume:
            self.root = Path(resume).expanduser().resolve()
            if not (self.root / STATE).is_file():
                raise FileNotFoundError(f"--resume: {self.root} is not a schedule's run directory (no {STATE})")
        else:
            name = run_name or f"{schedule.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            self.root = (Path(schedule.output_dir).expanduser() / name).resolve()  # the matrix names absolute paths
            if (self.root / STATE).is_file():
                raise FileExistsError(f"{self.root} already holds a schedule run: pass --resume {self.root} to "
                                      "continue it, or choose another name")
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "schedule.yaml").write_text(yaml.safe_dump({"schedule": asdict(schedule)}, sort_keys=False))
            self._save_state({"finals": {}})
        self.state = json.loads((self.root / STATE).read_text())

    def _save_state(self, state: dict) -> None:
        tmp = self.root / (STATE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.root / STATE)  # atomic: a kill never leaves half a state behind

    def run(self) -> dict:
        plan = units(self.schedule)
        current = self.start_weights(plan[0])
        self.measure("start", current)
        for unit in plan:
            if unit.name not in self.state["finals"]:
                print(f"== stage {unit.name}: {', '.join(unit.recipes)}"
                      + (f", {unit.steps} steps" if unit.steps else "") + " ==")
                self.state["finals"][unit.name] = self.train(unit, current)
                self._save_state(self.state)
            current = self.state["finals"][unit.name]
            if unit.last_of_stage:
                self.measure(unit.stage.name, current)
        matrix = read_matrix(self.root)
        plot_matrix(matrix, self.root / PLOT)
        print(matrix_table(matrix))
        print(f"interference: {self.root / MATRIX}  plot: {self.root / PLOT}\nfinal weights: {current}")
        return {"run": str(self.root), "final weights": current, "matrix": matrix}

    def start_weights(self, first: Unit) -> str:
        """The first stage's starting point: schedule.init_from, or the backbone its recipe builds."""
        if self.schedule.init_from:
            return str(Path(self.schedule.init_from).expanduser())
        return str(get_mode(stage_recipe(self.schedule, next(iter(first.recipes)), first.stage)).backbone_path())

    def configs(self, unit: Unit, init_from: str) -> list[tuple[RecipeConfig, float]]:
        extra = [f"run.output_dir={self.root / 'stages'}", f"run.name={unit.name}", f"run.init_from={init_from}"]
        if unit.steps:
            extra.append(f"train.steps={unit.steps}")
        return [(stage_recipe(self.schedule, recipe, unit.stage, extra), share) for recipe, share in unit.recipes.items()]

    def train(self, unit: Unit, init_from: str) -> str:
        """Run (or continue) one unit from `init_from`; its final weights."""
        from speechrl.rlhf.trainers.runners import RUNNERS
        from speechrl.rlhf.trainers.reward_model import trainer_checkpoint
        from speechrl.rlhf.trainers.sft_mix import run_sft_mix

        run_dir = self.root / "stages" / unit.name
        resume = str(run_dir) if latest_checkpoint(run_dir) or trainer_checkpoint(run_dir) else None
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)  # stopped before its first checkpoint: nothing to keep
        parts = self.configs(unit, init_from)
        if len(parts) > 1:
            result = run_sft_mix(parts, resume=resume)
        else:
            result = RUNNERS[parts[0][0].algorithm]()(parts[0][0], resume=resume)
        return str(result["final weights"])

    def measure(self, row: str, checkpoint: str) -> None:
        """Every evaluation's metrics of `checkpoint`, as the matrix's row `row` (skipped when present)."""
        from speechrl.rlhf.trainers.evaluate import evaluate_in_process, evaluate_on_engines

        matrix = read_matrix(self.root)
        if any(r["row"] == row for r in matrix["rows"]) or not self.schedule.evaluate:
            return
        print(f"== interference: every mode's held-out metric, {row} ==")
        metrics = {}
        for evaluation in self.schedule.evaluate:
            cfg = load_recipe(evaluation.recipe, [*self.schedule.shared, *evaluation.overrides])
            out_dir = self.root / "interference" / row / evaluation.recipe.replace("/", "_")
            if evaluation.on_engines:
                mode, values = evaluate_on_engines(cfg, Path(checkpoint), out_dir)
            else:
                mode, values, _ = evaluate_in_process(cfg, Path(checkpoint), out_dir)
            keys = [key for _, key in mode.headlines if key in values] or sorted(values)
            metrics.update({f"{mode.name}/{key}": float(values[key]) for key in keys})
        matrix["rows"].append({"row": row, "checkpoint": checkpoint, "metrics": metrics})
        (self.root / MATRIX).write_text(json.dumps(matrix, indent=2) + "\n")


def read_matrix(root: Path) -> dict:
    path = Path(root) / MATRIX
    return json.loads(path.read_text()) if path.is_file() else {"rows": []}


def matrix_table(matrix: dict) -> str:
    """The matrix as text: a line per metric, a column per evaluation point (the start, then after each
    stage), each value with its change from the column before: what that stage did to the metric."""
    rows = matrix["rows"]
    metrics = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    width = max(len(m) for m in metrics + ["metric"])
    lines = ["  ".join([f"{'metric':<{width}}", *(f"{r['row']:>17}" for r in rows)])]
    for metric in metrics:
        cells = [f"{metric:<{width}}"]
        for i, r in enumerate(rows):
            value = r["metrics"].get(metric, math.nan)
            before = rows[i - 1]["metrics"].get(metric, math.nan) if i else math.nan
            delta = f" ({value - before:+.3f})" if math.isfinite(before) and math.isfinite(value) else ""
            cells.append(f"{value:.3f}{delta}".rjust(17))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def plot_matrix(matrix: dict, out: Path) -> Path:
    """One panel per metric: its value at the start and after each stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = matrix["rows"]
    columns = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    across = min(4, max(1, len(columns)))
    down = max(1, math.ceil(len(columns) / across))
    fig, axes = plt.subplots(down, across, figsize=(4 * across, 3.2 * down), squeeze=False)
    names = [r["row"] for r in rows]
    for ax in axes.flat[len(columns):]:
        ax.set_visible(False)
    for ax, column in zip(axes.flat, columns):
        ax.plot(range(len(rows)), [r["metrics"].get(column, math.nan) for r in rows], marker="o")
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(column, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def run_schedule(schedule: ScheduleConfig, resume: Optional[str] = None, run_name: Optional[str] = None) -> dict:
    return ScheduleRun(schedule, resume, run_name).run()


def latest_schedule_run(schedule: ScheduleConfig) -> str:
    """Bare `--resume`: the newest <output_dir>/<name>-* that is a schedule's run directory."""
    runs = sorted(p for p in Path(schedule.output_dir).expanduser().glob(f"{schedule.name}-*") if (p / STATE).is_file())
    if not runs:
        raise FileNotFoundError(f"--resume: no {schedule.name}-* schedule run under {schedule.output_dir}")
    return str(runs[-1])
