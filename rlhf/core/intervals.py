"""Whether a held-out change is beyond the evaluation's noise: per-example score files and paired
bootstrap intervals over their examples.

Every mode that keeps per-example scores (`Mode.example_scores`) writes JSON lines of
{"id", <metric key>: value or null, ...}; an id may repeat (TTS's repeats of one text, realtime's turns
of one dialogue) and its lines are averaged before resampling, so examples that share a context stay
together. `speechrl eval A B ...` and the demos compare two such files with `paired_intervals`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from scipy.stats import bootstrap

RESAMPLES = 2000  # bootstrap draws of the held-out examples for a paired interval
LABELS = ("id", "text", "repeat")  # what a row names; every other numeric value is a score


def mean_interval(diffs: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean of `diffs` (one value an example); NaNs where
    fewer than two examples leave nothing to resample."""
    diffs = np.asarray(diffs, dtype=float)
    if diffs.size < 2:
        return math.nan, math.nan
    low, high = bootstrap((diffs,), np.mean, n_resamples=RESAMPLES, method="percentile",
                          rng=rng).confidence_interval
    return float(low), float(high)


def write_example_scores(path: Path, rows: Iterable[dict]) -> Path:
    """One JSON line a row ({"id", ..., <metric key>: float or None}); non-finite scores become null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            f.write(json.dumps(clean) + "\n")
    return path


def example_table(path: Path) -> dict[str, dict[str, float]]:
    """metric key -> example id -> its mean over the file's lines for that id (unscored left out), from
    a per-example scores file, read once. Text values (a transcript beside its WER) are not scores."""
    values: dict[str, dict[str, list[float]]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                example = str(row["id"])
                for key, value in row.items():
                    if key not in LABELS and value is not None and not isinstance(value, str):
                        values.setdefault(key, {}).setdefault(example, []).append(float(value))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}, line {number}: not a per-example score ({type(e).__name__}: {e}); "
                                 "evaluate that checkpoint again to rewrite the file") from None
    return {key: {k: float(np.mean(v)) for k, v in by_id.items()} for key, by_id in values.items()}


def example_means(path: Path, key: str) -> dict[str, float]:
    """Each example id's mean of `key` in a per-example scores file (unscored left out)."""
    return example_table(path).get(key, {})


@dataclass
class Change:
    """One headline's change from the first file to another, with its 95 % interval (NaN: too few examples)."""
    label: str
    name: str
    change: float
    low: float
    high: float
    count: int

    @property
    def beyond_noise(self) -> bool:
        return not (math.isnan(self.low) or self.low <= 0 <= self.high)


def paired_changes(headlines: list[tuple[str, str]], files: list[tuple[str, Path]], seed: int = 0) -> list[Change]:
    """Each file's change from the first in every headline the files have, with a 95 % bootstrap
    interval: the held-out examples are resampled (each example's mean over its lines), so the interval
    holds the draws' noise and the choice of examples both. The change is the mean of per-example
    changes over the examples both scored."""
    rng = np.random.default_rng(seed)
    tables = [example_table(path) for _, path in files]  # each file read once, not once per headline
    changes = []
    for label, key in headlines:
        base = tables[0].get(key, {})
        for (name, _), table in zip(files[1:], tables[1:]):
            other = table.get(key, {})
            ids = sorted(set(base) & set(other))
            if ids:
                diff = np.array([other[i] - base[i] for i in ids])
                changes.append(Change(label, name, float(diff.mean()), *mean_interval(diff, rng), len(ids)))
    return changes


def describe(changes: list[Change], unit: str = "examples") -> str:
    """One line a change: "<label>, <name>: +0.012  95% interval [low, high] over N <unit>", marked where
    the interval excludes 0."""
    lines = []
    for c in changes:
        if math.isnan(c.low):
            interval = f"(no interval: {c.count} {unit}, too few to resample)"
        else:
            interval = (f"95% interval [{c.low:+.3f}, {c.high:+.3f}] over {c.count} {unit}"
                        + ("  (beyond the noise)" if c.beyond_noise else ""))
        lines.append(f"{c.label}, {c.name}: {c.change:+.3f}  {interval}")
    return "\n".join(lines) or "(no per-example scores of the mode's headline metrics)"


def paired_intervals(headlines: list[tuple[str, str]], files: list[tuple[str, Path]], seed: int = 0,
                     unit: str = "examples") -> str:
    """`paired_changes`, described."""
    return describe(paired_changes(headlines, files, seed), unit)


def first_and_last(files: dict[int, Path]) -> Optional[list[tuple[str, Path]]]:
    """The earliest and latest evaluations' files of a run ({step: path}), named by step; None with fewer than two."""
    if len(files) < 2:
        return None
    steps = sorted(files)
    return [(f"step {steps[0]}", files[steps[0]]), (f"step {steps[-1]}", files[steps[-1]])]
