"""Import the PersonaGym benchmark (200 personas, 50 questions each) as cards and dialogues.

PersonaGym (Samuel et al. 2024, MIT) describes a persona in one sentence; the import adds nothing it
does not say (`identity` the sentence, `name` its first clause, `facts` its clauses, the rest empty).
Each (persona, task) is one dialogue of that task's questions, `meta["task"]` naming it. The data is
read where it lies (`shared_data_dir`), never copied into this repository.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from speechrl.data.dialogues import Dialogue, Turn
from speechrl.data.errors import PersonaError
from speechrl.data.personas import PersonaCard
from speechrl.data.rows import CheckedList, Located, OnBad, keep_good, read_rows

BENCHMARK = "personas/personagym_benchmark_v1.jsonl"  # under the shared data folder
SOURCE = "PersonaGym benchmark-v1 (MIT, github.com/vsamuel2003/PersonaGym)"
# Clause breaks: a comma, or " who " ("A 20-year-old musician from Toronto who enjoys painting").
_CLAUSE = re.compile(r"\s*,\s*(?:who\s+)?|\s+who\s+")


def shared_data_dir() -> Path:
    """$SPEECHRL_SHARED_DATA, else `../shared/data` beside the repository checkout."""
    env = os.environ.get("SPEECHRL_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def personagym_present() -> bool:
    """Whether PersonaGym's benchmark file is in the shared data folder."""
    return (shared_data_dir() / BENCHMARK).is_file()


def clauses(description: str) -> list[str]:
    """The description cut at commas and at "who", each piece as written (a leading "who" dropped)."""
    return [c for c in _CLAUSE.split(description.strip().rstrip(".")) if c]


def import_personagym(path: str | Path | None = None, *,
                      on_bad: OnBad = "skip") -> tuple[CheckedList, list[Dialogue]]:
    """(cards, dialogues) from the benchmark JSONL (default: `shared_data_dir()/BENCHMARK`). Card ids
    are `personagym-<row number from 0, 3 digits>`; dialogue ids `<card id>-<task slug>`. A malformed row
    costs only its own persona (on_bad="skip") or stops the import (on_bad="fail")."""
    path = Path(path) if path is not None else shared_data_dir() / BENCHMARK
    if not path.is_file():
        raise FileNotFoundError(f"PersonaGym benchmark not found at {path}; pass its path, or set "
                                "SPEECHRL_SHARED_DATA to the folder holding personas/")
    dialogues: list[Dialogue] = []

    def make(item: tuple[int, tuple[Located, Any]]) -> PersonaCard:
        index, (loc, row) = item
        card, tasks = _persona(row, loc, index)
        dialogues.extend(Dialogue(f"{card.id}-{_slug(task)}", card,
                                  tuple(Turn("user", q, meta={"task": task}) for q in questions),
                                  meta={"source": card.source})
                         for task, questions in tasks.items())
        return card

    return keep_good(enumerate(read_rows(path, "the benchmark")), make, on_bad, "cards"), dialogues


def _persona(row: Any, loc: Located, index: int) -> tuple[PersonaCard, dict[str, list[str]]]:
    if isinstance(row, PersonaError):
        raise row
    if not isinstance(row, dict):
        raise PersonaError(loc.where, None, f"expected a JSON object, got {type(row).__name__}")
    description = row.get("persona")
    if not isinstance(description, str) or not description.strip():
        raise PersonaError(loc.where, "persona", f"got {description!r}; a PersonaGym row describes its persona "
                                                 "in a non-empty string")
    tasks = row.get("questions")
    if not isinstance(tasks, dict) or not tasks:
        raise PersonaError(loc.where, "questions", "must map each task name to a list of questions")
    for task, questions in tasks.items():
        if not isinstance(questions, list) or not questions:
            raise PersonaError(loc.where, f"questions.{task}", "must be a non-empty list of questions")
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise PersonaError(loc.where, f"questions.{task}[{i}]", f"got {q!r}; a question is a non-empty string")
    parts = clauses(description)
    try:
        card = PersonaCard(id=f"personagym-{index:03d}", name=parts[0], identity=description.strip(),
                           facts=tuple(dict.fromkeys(parts)), source=f"{SOURCE}, {loc.where.rsplit('/', 1)[-1]}")
    except PersonaError as e:
        raise loc.error(e) from None
    return card, tasks


def _slug(task: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", task.lower()).strip("-") or "task"
