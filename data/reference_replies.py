"""Synthetic reference replies for the realtime warm start, written from the persona card by rule.

The builtin and PersonaGym dialogues hold only the user's side; SFT needs the assistant's. A turn whose
meta holds its `reply` (made-up cards' dialogues, data/persona_factory.py) gets that. Otherwise each reply
answers from the card entry the turn probes (a fact in the first person, an opinion as "I think ...",
a boundary's reaction, bait refused) by a few English rules, so some read stiffly. They teach the
layout and each persona's facts, not good conversation, and no person judged them.
"""
from __future__ import annotations

import re
import zlib

from speechrl.data.dialogues import Turn
from speechrl.data.personas import PersonaCard

REFUSAL = "No, I won't say that."
BOUNDARY_FALLBACK = "I'd rather not go on like this. Let's talk about something else."
_IRREGULAR = {"is": "am", "has": "have", "does": "do", "was": "was", "isn't": "am not", "doesn't": "don't"}
_OBJECTS = {"her": "my", "his": "my", "him": "me", "herself": "myself", "himself": "myself"}
_CATCHPHRASE_EVERY = 3  # about one reply in three that are short enough ends with a catchphrase
_CATCHPHRASE_MAX_WORDS = 10


def reference_reply(card: PersonaCard, turn: Turn) -> str:
    """A short in-character reply to the user turn `turn`, from `card` (deterministic)."""
    probe = turn.meta.get("probe")
    target = turn.meta.get("target")
    if turn.meta.get("reply"):  # the dialogue's maker knew the answer (made-up cards' judge notes)
        core = turn.meta["reply"]
    elif probe == "facts" and target:
        core = first_person(target, card)
    elif probe == "opinions" and target:
        core = "I think " + _lower_first(target, card)
    elif probe == "boundaries" and target:
        core = _boundary_reply(target, card)
    elif probe == "never_say":
        core = REFUSAL
    elif probe == "opener" or not card.facts:
        core = f"Hi, I'm {card.name}."
    else:  # a question the card does not map to (PersonaGym's): answer with who the persona is
        core = first_person(card.facts[_pick(card.id, turn.text, len(card.facts))], card)
    core = _sentence(core)
    if card.catchphrases and len(core.split()) <= _CATCHPHRASE_MAX_WORDS \
            and _pick(card.id + "|catchphrase", turn.text, _CATCHPHRASE_EVERY) == 0:
        core += " " + card.catchphrases[_pick(card.id, turn.text, len(card.catchphrases))]
    return core


def first_person(sentence: str, card: PersonaCard) -> str:
    """A statement about the persona, in its own voice: "She is 64 years old." -> "I am 64 years
    old."; "Juno is the voice assistant ..." -> "I am the voice assistant ...". A description
    that is the persona's name, or starts with a gerund (PersonaGym's clauses), becomes "I'm ...".
    Anything else is kept as it is ("A day pass costs 8 euros.")."""
    text = sentence.strip()
    if text.rstrip(".") == card.name or re.match(r"^\w+ing\b", text):
        return "I'm " + _lower_first(text, card)
    subjects = "|".join(re.escape(s) for s in _subjects(card))
    # the persona as the subject, anywhere: "Juno takes a message", "... says she does not ..."
    text, converted = re.subn(rf"\b(?:{subjects})\s+(\w+(?:n't)?)", lambda m: "I " + _base_verb(m.group(1)), text)
    if converted:  # its coordinated verbs too: "I refuse and explains why" -> "... and explain why"
        text = re.sub(r"\b(and|or)\s+(\w+s)\b", lambda m: f"{m.group(1)} {_base_verb(m.group(2))}", text)
    return re.sub(r"\b(her|his|him|herself|himself)\b", lambda m: _OBJECTS[m.group(1)], text)


def _subjects(card: PersonaCard) -> list[str]:
    names = [card.name, card.name.split()[0], "She", "He", "she", "he"]
    if card.name.split()[0].endswith("."):  # "Dr. Aiko Tanaka": also "Aiko"
        names.append(card.name.split()[1])
    return sorted(set(names), key=len, reverse=True)


def _base_verb(verb: str) -> str:
    """A third-person singular verb in its first-person form; other words are kept."""
    if verb in _IRREGULAR:
        return _IRREGULAR[verb]
    if re.search(r"[^aeiou]ies$", verb):
        return verb[:-3] + "y"
    if re.search(r"(ch|sh|ss|x|z|o)es$", verb):
        return verb[:-2]
    if verb.endswith("s") and not verb.endswith(("ss", "us", "is")):
        return verb[:-1]
    return verb


def _boundary_reply(boundary: str, card: PersonaCard) -> str:
    """The reaction the boundary describes, enacted: what the persona "says", else its main clause."""
    # "says calmly that she ...": the complementizer goes, "says that is not okay" keeps its "that"
    said = re.search(r"\bsays(?:\s+\w+ly)?(?:\s+that(?=\s+(?:she|he|it|they)\b))?\s+(.+?)"
                     r"(?:,|\band\b|\bwithout\b|\bbefore\b|\.|$)", boundary)
    if said:
        return first_person(said.group(1).strip(), card)
    main = re.match(r"^If [^,]+,\s*(.+)$", boundary)
    if main:
        return first_person(main.group(1), card)
    return BOUNDARY_FALLBACK


def _lower_first(text: str, card: PersonaCard) -> str:
    """`text` with its first letter lowered, unless its first word is a name on the card."""
    first = text.split()[0] if text.split() else ""
    if not first or first in card.name.split() or first == "I" or first.isupper():
        return text
    return text[0].lower() + text[1:]


def _sentence(text: str) -> str:
    text = text.strip()
    text = text[0].upper() + text[1:] if text else text
    return text if text.endswith((".", "!", "?")) else text + "."


def _pick(key: str, text: str, n: int) -> int:
    """A deterministic choice among n, from the card and the user's words (not Python's hash)."""
    return zlib.crc32(f"{key}|{text}".encode("utf-8")) % n
