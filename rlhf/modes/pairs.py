"""Offline DPO's and the reward model's pairs as token rows, and the reader of the pair files online
DPO runs save.

Each mode turns one saved row into a `PreferenceRow` (Mode.preference_rows) or a `RewardPair`
(`reward_model_pairs`, in the modes that train reward models); reading files, naming a bad line and
skipping or stopping on it is shared here, through data/preferences.py's `keep_good`, which the TTS
preference format uses too.
"""
from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Callable, NamedTuple, Optional, TypeVar

import numpy as np

from speechrl.data.audio import BadExample
from speechrl.data.preferences import PreferenceError, keep_good

Row = TypeVar("Row")  # PreferenceRow (offline DPO) or RewardPair (the reward model)


class PreferenceRow(NamedTuple):
    """One offline preference pair as the trainer reads it: token in, token out."""
    prompt_ids: list[int]
    chosen_ids: list[int]  # completion ids, end token included
    rejected_ids: list[int]
    audio: Optional[np.ndarray]  # the prompt's clip (ASR, realtime), or None for a text-only prompt (TTS)


class RewardPair(NamedTuple):
    """One pair as a (text-only) reward model reads it: each side the whole sequence, context then reply."""
    group: str  # what the held-out split keeps whole: TTS the text, realtime the persona card
    chosen_ids: list[int]
    rejected_ids: list[int]


class RewardModelPairs(NamedTuple):
    """A mode's answer to `reward_model_pairs`: the pairs and what the trainer reports about them."""
    pairs: list[RewardPair]
    read: int  # pairs read, bad ones included (read - len(pairs) were left out)
    bad: list[str]  # the first pairs left out, each named (file and line, or id) with why
    split_by: str  # what `RewardPair.group` is ("text", "persona"): the split's messages and the meta name it
    sequence: str  # a side written out with placeholders (context, then reply): the meta records the format


def read_pair_rows(source: str, row_of: Callable[[dict], Row], on_bad: str, key: str = "dpo.data"
                   ) -> tuple[list[Row], dict]:
    """Preference rows from a .jsonl file, a glob of them, or every .jsonl file in a folder (an online
    DPO run's `pairs/`), each line turned into a row by `row_of` (`key`: the recipe field `source`
    came from, for messages). A line that is not JSON, or that `row_of` refuses (ValueError, a
    BadExample, a missing field), is skipped with a warning naming its file and line, or stops the
    run with `on_bad` = "fail". Returns the rows and a summary."""
    path = Path(source).expanduser()
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [Path(f) for f in sorted(glob.glob(str(path)))] or [path]
    if not files:
        raise ValueError(f"{key}={source}: a folder without .jsonl files")
    lines = [(f"{f}:{number}", line) for f in files
             for number, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]

    def make(item: tuple[str, str]) -> Row:
        where, line = item
        try:
            return row_of(json.loads(line))
        except (ValueError, AttributeError, KeyError, TypeError, BadExample) as e:  # json errors are ValueErrors
            raise PreferenceError(where, None, f"{e.source}: {e.reason}" if isinstance(e, BadExample) else str(e)) from e

    rows = keep_good(lines, make, on_bad)
    return list(rows), {"pairs": len(rows), "read": rows.num_pairs, "bad": [str(e) for e in rows.bad][:20],
                        "files": len(files)}
