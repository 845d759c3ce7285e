"""Offline DPO's pairs as token rows, and the reader of the pair files online DPO runs save.

Each mode turns one saved row into a `PreferenceRow` (Mode.preference_rows); reading files, naming a
bad line and skipping or stopping on it is shared here, through data/preferences.py's `keep_good`,
which the TTS preference format uses too.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np

from speechrl.data.audio import BadExample
from speechrl.data.preferences import PreferenceError, keep_good


class PreferenceRow(NamedTuple):
    """One offline preference pair as the trainer reads it: token in, token out."""
    prompt_ids: list[int]
    chosen_ids: list[int]  # completion ids, end token included
    rejected_ids: list[int]
    audio: Optional[np.ndarray]  # the prompt's clip (ASR, realtime), or None for a text-only prompt (TTS)


def read_pair_rows(source: str, row_of: Callable[[dict], PreferenceRow], on_bad: str
                   ) -> tuple[list[PreferenceRow], dict]:
    """Preference rows from a .jsonl file, or from every .jsonl file in a folder (an online DPO run's
    `pairs/`), each line turned into a row by `row_of`. A line that is not JSON, or that `row_of`
    refuses (ValueError, a BadExample, a missing field), is skipped with a warning naming its file and
    line, or stops the run with `on_bad` = "fail". Returns the rows and a summary."""
    path = Path(source).expanduser()
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"dpo.data={source}: a folder without .jsonl files")
    lines = [(f"{f}:{number}", line) for f in files
             for number, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]

    def make(item: tuple[str, str]) -> PreferenceRow:
        where, line = item
        try:
            return row_of(json.loads(line))
        except (ValueError, AttributeError, KeyError, TypeError, BadExample) as e:  # json errors are ValueErrors
            raise PreferenceError(where, None, f"{e.source}: {e.reason}" if isinstance(e, BadExample) else str(e)) from e

    rows = keep_good(lines, make, on_bad)
    return list(rows), {"pairs": len(rows), "bad": [str(e) for e in rows.bad][:20], "files": len(files)}
