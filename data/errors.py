"""The error a record reader in data/ raises for one unusable row: where it is, which field, and
what is wrong with what to do. Each reader has its own subclass (PersonaError here; PreferenceError
in preferences.py), so that skipping bad rows of one kind never swallows errors of another.
"""
from __future__ import annotations

from typing import Any


class FieldError(ValueError):
    """`where` (file:line, or the record's id), `field` (a dotted path such as "never_say[2]", or
    None when the whole row is wrong) and the problem, with what to do."""

    def __init__(self, where: str, field: str | None, problem: str):
        super().__init__(where, field, problem)  # args kept so the error pickles across workers
        self.where, self.field, self.problem = where, field, problem

    def __str__(self) -> str:
        if self.field is None:
            return f"{self.where}: {self.problem}"
        return f"{self.where}: field {self.field!r}: {self.problem}"


class PersonaError(FieldError):
    """A card (or a dialogue: DialogueError is one) is unusable."""


def show(value: Any) -> str:
    """repr, cut short: a wrong value may be a whole paragraph or a clip's bytes."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
