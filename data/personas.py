"""Persona cards for the realtime mode: who the persona is, how it talks, what it must never say.

docs/personas.md is the format. `PersonaCard` checks its own fields, so a card built in code meets
the rules of one read from a file; reading rejects unknown keys, so a misspelt `never_says:` is an
error, not a silently empty list. A bad card costs only itself (on_bad="skip") or stops the read.
`render(card)` is the one text form of a card that prompts and judges include.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from speechrl.data.errors import PersonaError, show
from speechrl.data.rows import SUFFIXES, CheckedList, Located, OnBad, check_keys, keep_good, read_rows
from speechrl.data.files import write_text_atomic

LIST_FIELDS = ("facts", "opinions", "catchphrases", "boundaries", "never_say")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class PersonaCard:
    """One persona. Lists are stored as tuples of non-empty strings; `meta` holds free-form extras."""

    id: str  # unique name, [A-Za-z0-9_.-]: dialogues refer to the card by it
    name: str  # what the persona is called (PersonaGym cards: a short description, see docs)
    identity: str  # who it is, in a few sentences
    facts: tuple[str, ...] = ()  # true statements about it that a reply must not contradict
    opinions: tuple[str, ...] = ()  # what it thinks, each with its stance
    speaking_style: str = ""  # how it talks: register, pace, sentence length, vocabulary
    catchphrases: tuple[str, ...] = ()  # phrases it uses now and then (verbatim)
    boundaries: tuple[str, ...] = ()  # emotional boundaries: what it will not put up with, and how it reacts
    never_say: tuple[str, ...] = ()  # phrases or content it must never say
    source: str | None = None  # provenance, e.g. "PersonaGym benchmark-v1, line 18 (MIT)"
    meta: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        where = f"persona {self.id!r}" if isinstance(self.id, str) and self.id else "persona"
        if not isinstance(self.id, str) or not _ID.match(self.id):
            raise PersonaError(where, "id", f"got {show(self.id)}; use letters, digits, '_', '.', '-' "
                                            "(a dialogue names its persona by this id)")
        for name in ("name", "identity"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise PersonaError(where, name, f"{_missing_or(value)}; give a non-empty string")
        for name in LIST_FIELDS:
            object.__setattr__(self, name, _strings(getattr(self, name), where, name))
        if not isinstance(self.speaking_style, str):
            raise PersonaError(where, "speaking_style", f"must be a string, got {show(self.speaking_style)}")
        if self.source is not None and not isinstance(self.source, str):
            raise PersonaError(where, "source", f"must be a string, got {show(self.source)}")
        if not isinstance(self.meta, dict):
            raise PersonaError(where, "meta", f"must be a mapping, got {show(self.meta)}")


def _strings(value: Any, where: str, name: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise PersonaError(where, name, f"must be a list of strings, got {show(value)}; "
                                        "in YAML write one '- item' line per entry")
    seen: dict[str, int] = {}
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise PersonaError(where, f"{name}[{i}]", f"{_missing_or(item)}; each entry is a non-empty string "
                                                     "(delete the entry rather than leave it blank)")
        if item.strip() in seen:
            raise PersonaError(where, f"{name}[{i}]", f"repeats {name}[{seen[item.strip()]}] ({item!r})")
        seen[item.strip()] = i
    return tuple(item.strip() for item in value)


def _missing_or(value: Any) -> str:
    if value is None:
        return "missing"
    return "empty" if isinstance(value, str) else f"not a string: {show(value)}"


# --- the one text form ------------------------------------------------------------------------------
_SECTIONS = (("facts", "Facts"), ("opinions", "Opinions"), ("boundaries", "Emotional boundaries"),
             ("never_say", "Never say"))


def render(card: PersonaCard) -> str:
    """The card as a compact text block for a prompt or a judge's rubric; empty fields are left out.
    Deterministic: the same card always renders to the same text (id, source and meta are not shown)."""
    lines = [f"Name: {card.name}", f"Identity: {card.identity}"]
    if card.speaking_style:
        lines.append(f"Speaking style: {card.speaking_style}")
    if card.catchphrases:
        lines.append("Catchphrases: " + "; ".join(f'"{c}"' for c in card.catchphrases))
    for name, title in _SECTIONS:
        if getattr(card, name):
            lines.append(f"{title}:")
            lines.extend(f"- {item}" for item in getattr(card, name))
    return "\n".join(lines)


def parse_rendered(text: str, id: str = "rendered") -> PersonaCard:
    """The card back from its `render` text (id, source and meta are not in it: `id` names it). For a
    reward that is given the persona column as text but must read the card's entries."""
    values: dict[str, Any] = {"id": id}
    titles = {title: name for name, title in _SECTIONS}
    section = None
    for line in text.splitlines():
        if section and line.startswith("- "):
            values.setdefault(section, []).append(line[2:])
            continue
        head, _, rest = line.partition(": ")
        if line.endswith(":") and line[:-1] in titles:
            section = titles[line[:-1]]
        elif head in ("Name", "Identity", "Speaking style"):
            values[head.lower().replace(" ", "_")], section = rest, None
        elif head == "Catchphrases":
            values["catchphrases"], section = re.findall(r'"([^"]+)"', rest), None
        elif line.strip():
            raise PersonaError("rendered card", None, f"line {line!r} is not part of a rendered card "
                                                      "(data.personas.render writes one)")
    return card_from_row(values, Located("rendered card"))


# --- reading ----------------------------------------------------------------------------------------
_CARD_KEYS = tuple(f.name for f in fields(PersonaCard))


def card_from_row(row: Any, loc: Located, prefix: str = "") -> PersonaCard:
    """A card from a parsed mapping; errors name `loc`'s file and line and the field (under `prefix`)."""
    if isinstance(row, PersonaError):
        raise row
    if not isinstance(row, dict):
        raise PersonaError(loc.at(prefix.rstrip(".") or None), prefix.rstrip(".") or None,
                           f"expected a mapping of card fields, got {show(row)}")
    check_keys(row, _CARD_KEYS, loc, prefix)
    values = {k: v for k, v in row.items() if v is not None}  # an empty YAML key means "not given"
    for name in ("id", "name", "identity"):
        if name not in values:
            raise PersonaError(loc.at(prefix.rstrip(".") or None), f"{prefix}{name}", "missing; every card needs "
                               "an id, a name and an identity")
    try:
        return PersonaCard(**values)
    except PersonaError as e:
        raise loc.error(e, prefix) from None


def read_personas(source: str | Path, *, on_bad: OnBad = "skip") -> CheckedList:
    """Cards from a .yaml/.yml/.json/.jsonl file, or from every such file in a folder (sorted by
    name). Returns a list of PersonaCard with `.bad` and `.summary()`; ids must be unique."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
        if not files:
            raise FileNotFoundError(f"persona folder {path} holds no {'/'.join(SUFFIXES)} files")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"persona file {path} does not exist")
    rows = [item for p in files for item in read_rows(p, "persona cards")]
    seen: dict[str, str] = {}

    def make(item) -> PersonaCard:
        loc, row = item
        card = card_from_row(row, loc)
        if card.id in seen:
            raise PersonaError(loc.at("id"), "id", f"duplicate id {card.id!r} (first at {seen[card.id]}); "
                                                   "give each card its own id")
        seen[card.id] = loc.at("id")
        return card

    return keep_good(rows, make, on_bad, "cards")


# --- writing ----------------------------------------------------------------------------------------
def card_to_row(card: PersonaCard) -> dict[str, Any]:
    """The card as a plain mapping in field order, empty optional fields left out."""
    row: dict[str, Any] = {"id": card.id, "name": card.name, "identity": card.identity}
    for f in fields(PersonaCard)[3:]:
        value = getattr(card, f.name)
        if value not in ((), "", None, {}):
            row[f.name] = list(value) if isinstance(value, tuple) else value
    return row


def write_personas(path: str | Path, cards: Iterable[PersonaCard]) -> Path:
    """Write cards that `read_personas` reads back equal: .jsonl (one per line), or .yaml/.yml/.json
    (one card as a mapping, several as a list). The file is replaced atomically."""
    path, rows = Path(path), [card_to_row(c) for c in cards]
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif path.suffix in (".yaml", ".yml", ".json"):
        data = rows[0] if len(rows) == 1 else rows
        text = (yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100) if path.suffix != ".json"
                else json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    else:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; use {', '.join(SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, text)
