"""A run directory: resolved recipe, JSONL metrics, TensorBoard events, plots, checkpoints, summary.

The layout is the README's "What a run writes"; checkpoints and final/ are backbone directories in HF
format, so transformers and vLLM load them as they are.
"""
from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import torch

from speechrl.rlhf.core.config import RecipeConfig, RunStopped, to_yaml
from speechrl.rlhf.core.seeding import rng_state, set_rng_state


def due(step: int, every: int, last: int) -> bool:
    """Whether a `*_every` event (eval, checkpoint, log) happens after `step`: every `every` steps
    and at the last one; `every` 0 means only at the last (the summary still has its "after")."""
    return step == last or (every > 0 and step % every == 0)


def new_run_dir(cfg: RecipeConfig) -> Path:
    name = cfg.run.name or f"{cfg.mode}-{cfg.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(cfg.run.output_dir).expanduser() / name
    if (path / "checkpoints").is_dir() and any((path / "checkpoints").iterdir()):
        raise FileExistsError(f"run directory {path} already has checkpoints: pass --resume to continue it, "
                              "or choose another run.name")
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_resume_dir(cfg: RecipeConfig, resume: str, latest: Optional[Callable[[Path], Optional[Path]]] = None) -> Path:
    """`--resume PATH` names a run dir; bare `--resume` takes run.name, else the newest matching run.
    `latest(run_dir)` finds a run's last complete checkpoint (default: `latest_checkpoint`'s step-N)."""
    latest = latest or latest_checkpoint
    if resume != "latest":
        path = Path(resume).expanduser()
    elif cfg.run.name:
        path = Path(cfg.run.output_dir).expanduser() / cfg.run.name
    else:
        prefix = f"{cfg.mode}-{cfg.algorithm}-"
        runs = sorted(p for p in Path(cfg.run.output_dir).expanduser().glob(prefix + "*") if latest(p))
        if not runs:
            raise FileNotFoundError(f"--resume: no {prefix}* run with a checkpoint under {cfg.run.output_dir}")
        path = runs[-1]
    if latest(path) is None:
        raise FileNotFoundError(f"--resume: {path} has no checkpoint to resume from (no complete one under checkpoints/)")
    return path


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    steps = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    complete = [p for p in steps if (p / "trainer_state.pt").is_file()]
    return complete[-1] if complete else None


def resume_hint(run_dir: Path) -> str:
    """Where a stopped run continues from: its last complete checkpoint, or nowhere yet."""
    last = latest_checkpoint(run_dir)
    return (f"the last complete checkpoint is {last}; continue with --resume {run_dir}" if last
            else f"{run_dir} has no complete checkpoint yet, so the run starts again from the beginning")


@contextmanager
def stop_on_write_error(run_dir: Path, what: str, partial: Optional[Path] = None):
    """A full disk or a read-only run directory while writing `what` stops the run with a message
    saying so and where to resume from, never a traceback; `partial` (a checkpoint being written) is
    removed to give the space back. A checkpoint is complete only once its trainer_state.pt exists,
    so a half-written one is never resumed from either way."""
    try:
        yield
    except OSError as e:
        cause = getattr(e, "cause", None) or e  # an error raised in a Ray worker (the policy's save) carries its own
        why = f"{cause.strerror}: {cause.filename}" if getattr(cause, "strerror", None) else str(cause).strip().splitlines()[-1]
        if partial is not None and not (partial / "trainer_state.pt").is_file():
            shutil.rmtree(partial, ignore_errors=True)
        raise RunStopped(f"could not write {what} ({why}); {resume_hint(run_dir)}, once the disk has room and "
                         "the run directory is writable") from e


@contextmanager
def writing_checkpoint(run_dir: Path, step: int, keep: int):
    """The step's checkpoint folder to write into (write trainer_state.pt last). A write that fails
    stops the run (stop_on_write_error); once written, checkpoints beyond the newest `keep` go."""
    path = run_dir / "checkpoints" / f"step-{step}"
    with stop_on_write_error(run_dir, f"the step-{step} checkpoint", partial=path):
        yield path
    prune_checkpoints(run_dir, keep)


class RunLogger:
    def __init__(self, run_dir: Path, cfg: RecipeConfig, plot_keys: list[str]):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir
        self.plot_keys = plot_keys
        (run_dir / "recipe.yaml").write_text(to_yaml(cfg))
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with stop_on_write_error(self.dir, f"step {step}'s metrics"), open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def rows(self) -> list[dict]:
        path = self.dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise ValueError(f"{path}: line {i + 1} is not JSON; the metrics log is damaged") from None
                # the last row was cut off by a full disk: that step is logged again on --resume
        return rows

    def first(self, key: str) -> float:
        """The earliest logged value of `key` (NaN if never logged)."""
        return next((r[key] for r in self.rows() if key in r), float("nan"))

    def last(self, key: str) -> float:
        """The latest logged value of `key` (NaN if never logged)."""
        return next((r[key] for r in reversed(self.rows()) if key in r), float("nan"))

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows past the checkpoint, which the continued run will write again."""
        kept = [r for r in self.rows() if r["step"] <= step]
        (self.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    def plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        keys = [k for k in self.plot_keys if any(k in r for r in rows)]
        fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3.2), squeeze=False)
        for ax, key in zip(axes[0], keys):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        out = self.dir / "curves.png"
        fig.savefig(out, dpi=90)
        plt.close(fig)
        return out

    def summary(self, table: dict) -> str:
        (self.dir / "summary.json").write_text(json.dumps({k: _plain(v) for k, v in table.items()}, indent=2) + "\n")
        width = max(len(k) for k in table)
        lines = [f"{k:<{width}}  {_fmt(v)}" for k, v in table.items()]
        bar = "-" * max(len(line) for line in lines)
        return "\n".join([bar, *lines, bar])

    def close(self) -> None:
        self.tb.close()

    def finish(self, table: dict) -> dict:
        """The run's end: curves plotted, the summary table printed (and written), the log closed."""
        self.plot()
        print(self.summary(table))
        self.close()
        return table


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    steps = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def write_trainer_state(path: Path, step: int, metrics: Optional[dict] = None) -> None:
    """Step, RNG and (optionally) the step's metrics row, written last: a checkpoint without
    trainer_state.pt is incomplete and never resumed from. The row lets a crash between checkpoint
    and log leave no hole in the resumed run's curves."""
    tmp = path / "trainer_state.pt.partial"
    torch.save({"step": step, "rng": rng_state(), "metrics": dict(metrics) if metrics else None}, tmp)
    tmp.rename(path / "trainer_state.pt")


def resume_run(checkpoint: Path, logger: "RunLogger") -> int:
    """Restore RNG and the metrics log to `checkpoint`; returns the step to continue after."""
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    set_rng_state(state["rng"])
    step = state["step"]
    logger.truncate_after(step)
    if state.get("metrics") and not any(r["step"] == step for r in logger.rows()):
        logger.log(step, state["metrics"])
    print(f"resumed {logger.dir} from {checkpoint.name} (step {step})")
    return step


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item()
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        return v.item()
    return v


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)
