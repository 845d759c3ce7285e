"""Rows of the YAML / JSON / JSONL files that persona cards and dialogues are written in, each with
where it came from (file and line; in YAML, the line of each key and list item), and keeping the
rows that make good records: a bad one costs only itself (on_bad="skip": logged, kept in `.bad`)
or stops the read (on_bad="fail").
"""
from __future__ import annotations

import difflib
import json
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import yaml

from speechrl.data.errors import PersonaError

log = logging.getLogger(__name__)

OnBad = Literal["skip", "fail"]
SUFFIXES = (".yaml", ".yml", ".json", ".jsonl")


# --- skip or fail -----------------------------------------------------------------------------------
class CheckedList(list):
    """The items that passed, in order; the errors of those that did not are in `.bad`."""

    def __init__(self, kept: Iterable, bad: list[PersonaError], num_items: int, kind: str):
        super().__init__(kept)
        self.bad, self.num_items, self.kind = bad, num_items, kind

    def summary(self) -> dict[str, Any]:
        """Counts, and one "<where>: <reason>" line per bad item."""
        return {self.kind: self.num_items, "kept": len(self), "bad": len(self.bad),
                "reasons": [str(e) for e in self.bad]}


def keep_good(items: Iterable, make: Callable[[Any], Any], on_bad: OnBad, kind: str) -> CheckedList:
    """make(item) for each item; a PersonaError drops the item (skip) or is raised (fail)."""
    if on_bad not in ("skip", "fail"):
        raise ValueError(f"on_bad must be 'skip' or 'fail', got {on_bad!r}")
    items = list(items)
    kept, bad = [], []
    for item in items:
        try:
            kept.append(make(item))
        except PersonaError as e:
            if on_bad == "fail":
                raise
            log.warning("skipping bad %s %s", kind.rstrip("s"), e)
            bad.append(e)
    return CheckedList(kept, bad, len(items), kind)


# --- reading ----------------------------------------------------------------------------------------
class Located:
    """Where one row came from: `at(field)` is "file:line" of that field where the format tells
    (YAML: each key and list item), else of the row (JSONL line) or the file (JSON)."""

    def __init__(self, where: str, lines: dict[str, int] | None = None, file: str | None = None):
        self.where, self.lines, self.file = where, lines or {}, file

    def at(self, field: str | None) -> str:
        line = None
        while field and line is None:  # "turns[2].text": its own line, else that of "turns[2]", ...
            line = self.lines.get(field)
            parent = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", field)
            field = parent if parent != field else None
        return f"{self.file}:{line}" if line is not None and self.file else self.where

    def error(self, e: PersonaError, prefix: str = "") -> PersonaError:
        """`e` (raised under a card's or dialogue's own name) placed at this row's file and line."""
        name = f"{prefix}{e.field}" if e.field else (prefix.rstrip(".") or None)
        return type(e)(self.at(name), name, e.problem)


def read_rows(path: Path, what: str) -> list[tuple[Located, Any]]:
    """The rows of a .yaml/.yml/.json file (one object, or a list) or a .jsonl file (one per line).
    A .jsonl line that is not JSON comes back as its PersonaError, to cost only its own row."""
    if path.suffix == ".jsonl":
        return list(_jsonl_rows(path))
    if path.suffix in (".yaml", ".yml"):
        return _yaml_rows(path)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise PersonaError(f"{path}:{e.lineno}", None, f"not valid JSON ({e.msg} at column {e.colno})") from e
        if isinstance(data, list):
            return [(Located(f"{path}[{i}]"), row) for i, row in enumerate(data)]
        return [(Located(str(path)), data)]
    raise PersonaError(str(path), None, f"unknown file type {path.suffix!r}; write {what} as "
                                        f"{', '.join(SUFFIXES)}")


def _jsonl_rows(path: Path):
    # Not manifest.jsonl_rows: that one stops the whole read at the first bad line.
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                where = f"{path}:{lineno}"
                try:
                    yield Located(where), json.loads(line)
                except json.JSONDecodeError as e:
                    yield Located(where), PersonaError(where, None, f"not valid JSON ({e.msg} at column {e.colno})")


def _yaml_rows(path: Path) -> list[tuple[Located, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # the node tree keeps each key's line
        data = None if node is None else yaml.SafeLoader("").construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise PersonaError(where, None, f"not valid YAML ({getattr(e, 'problem', None) or e})") from e
    if node is None:
        raise PersonaError(str(path), None, "the file is empty")
    pairs = zip(node.value, data) if isinstance(node, yaml.SequenceNode) and isinstance(data, list) \
        else [(node, data)]
    return [(Located(f"{path}:{n.start_mark.line + 1}", _key_lines(n), str(path)), row) for n, row in pairs]


def _key_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """Dotted field path -> 1-based line of its key (or list item), for nested mappings and lists."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = f"{prefix}.{key.value}" if prefix else str(key.value)
            lines[name] = key.start_mark.line + 1
            lines.update(_key_lines(value, name))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[f"{prefix}[{i}]"] = item.start_mark.line + 1
            lines.update(_key_lines(item, f"{prefix}[{i}]"))
    return lines


def check_keys(row: dict, allowed: Iterable[str], loc: Located, prefix: str = "",
               error: type[PersonaError] = PersonaError) -> None:
    """Unknown keys are errors (with the nearest known key), so a typo never silently drops a field."""
    allowed = list(allowed)
    for key in row:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise error(loc.at(f"{prefix}{key}"), f"{prefix}{key}",
                        f"unknown field; {hint}known fields: {', '.join(allowed)} "
                        "(put free-form extras under 'meta')")
