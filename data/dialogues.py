"""Dialogues for the realtime mode: a persona and the turns spoken so far (docs/personas.md).

User turns given only as text are spoken by `synthesize_user_turns` (espeak-ng, once per text and
voice: the wav's name hashes both). As with cards, unknown keys are errors naming file, line and
field, and a bad dialogue costs only itself (on_bad="skip") or stops the read (on_bad="fail").
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from speechrl.data.errors import PersonaError, show
from speechrl.data.personas import PersonaCard, card_from_row, card_to_row
from speechrl.data.rows import CheckedList, Located, OnBad, check_keys, keep_good, read_rows
from speechrl.data.files import write_text_atomic

if TYPE_CHECKING:  # the codec module imports torch; reading dialogues should not
    from speechrl.rollouts.codec import AudioCodec

log = logging.getLogger(__name__)

ROLES = ("user", "assistant")
# The user's voices, one per dialogue (picked by its id): the policy hears more than one speaker.
USER_VOICES = ("en-us", "en", "en-gb-x-rp")


class DialogueError(PersonaError):
    """One dialogue is unusable: `where` (file:line, or its id), `field` ("turns[2].codec_ids[5]")
    and why. A PersonaError, so one except clause catches bad cards and bad dialogues."""


@dataclass(frozen=True)
class Turn:
    """One turn. User: `text` and/or `audio` (absolute path). Assistant: `text`, and optionally
    `codec_ids` (codec-local ids of the spoken reply, as the recipe codec's encode() gives them)
    and `audio`. `meta` holds free-form extras (PersonaGym's task, the builtin probes' targets)."""

    role: str
    text: str | None = None
    audio: str | None = None
    codec_ids: tuple[int, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        where = "turn"
        if self.role not in ROLES:
            raise DialogueError(where, "role", f"{show(self.role)} is not a role; use one of {list(ROLES)}")
        if self.text is not None and (not isinstance(self.text, str) or not self.text.strip()):
            raise DialogueError(where, "text", f"{'empty' if isinstance(self.text, str) else show(self.text)}; "
                                               "give what was said, or leave the field out")
        if self.audio is not None and (not isinstance(self.audio, str) or not self.audio):
            raise DialogueError(where, "audio", f"must be an audio file path, got {show(self.audio)}")
        if not isinstance(self.meta, dict):
            raise DialogueError(where, "meta", f"must be a mapping, got {show(self.meta)}")
        if self.role == "user":
            if self.text is None and self.audio is None:
                raise DialogueError(where, "text", "missing; a user turn needs its text, its audio, or both")
            if self.codec_ids is not None:
                raise DialogueError(where, "codec_ids", "only assistant turns carry codec ids; give the "
                                                        "user's speech as 'audio' (the audio encoder hears it)")
        else:
            if self.text is None:
                raise DialogueError(where, "text", "missing; an assistant turn needs the text of its reply")
            if self.codec_ids is not None:
                object.__setattr__(self, "codec_ids", _codec_ids(self.codec_ids))


def _codec_ids(value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray)) or len(value) == 0:
        raise DialogueError("turn", "codec_ids", f"must be a non-empty list of ints, got {show(value)}")
    for pos, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise DialogueError("turn", f"codec_ids[{pos}]", f"is {v!r}; codec ids are ints >= 0 from the "
                                                            "recipe codec's encode()")
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class Dialogue:
    """A persona (its card) and the turns so far, in order; at least one is the user's."""

    id: str
    persona: PersonaCard
    turns: tuple[Turn, ...]
    meta: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        where = f"dialogue {self.id!r}"
        if not isinstance(self.id, str) or not self.id:
            raise DialogueError("dialogue", "id", f"must be a non-empty string, got {show(self.id)}")
        if not isinstance(self.persona, PersonaCard):
            raise DialogueError(where, "persona", f"must be a PersonaCard, got {show(self.persona)}")
        if not isinstance(self.turns, (list, tuple)) or not self.turns:
            raise DialogueError(where, "turns", f"must be a non-empty list of turns, got {show(self.turns)}")
        object.__setattr__(self, "turns", tuple(self.turns))
        for i, turn in enumerate(self.turns):
            if not isinstance(turn, Turn):
                raise DialogueError(where, f"turns[{i}]", f"must be a Turn, got {show(turn)}")
        if not any(t.role == "user" for t in self.turns):
            raise DialogueError(where, "turns", "has no user turn; a dialogue needs something to reply to")
        if not isinstance(self.meta, dict):
            raise DialogueError(where, "meta", f"must be a mapping, got {show(self.meta)}")


# --- reading ----------------------------------------------------------------------------------------
_DIALOGUE_KEYS = tuple(f.name for f in fields(Dialogue))
_TURN_KEYS = tuple(f.name for f in fields(Turn))


def read_dialogues(source: str | Path, *, personas: Iterable[PersonaCard] = (),
                   on_bad: OnBad = "skip") -> CheckedList:
    """Dialogues from a .jsonl file (or .yaml/.json: one dialogue or a list). A `persona` given as
    an id is looked up in `personas`; an inline card is read like a card file's. Relative audio
    paths start from the file's folder and must exist. Returns a list of Dialogue with `.bad` and
    `.summary()`; ids must be unique."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"dialogue file {path} does not exist")
    known = {c.id: (c, "the personas passed in") for c in personas}
    base, seen = path.absolute().parent, {}

    def make(item) -> Dialogue:
        loc, row = item
        dialogue = _dialogue(row, loc, base, known)
        if dialogue.id in seen:
            raise DialogueError(loc.at("id"), "id", f"duplicate id {dialogue.id!r} (first at "
                                                    f"{seen[dialogue.id]}); give each dialogue its own id")
        seen[dialogue.id] = loc.at("id")
        return dialogue

    return keep_good(read_rows(path, "dialogues"), make, on_bad, "dialogues")


def _dialogue(row: Any, loc: Located, base: Path, known: dict) -> Dialogue:
    if isinstance(row, PersonaError):  # a line that is not JSON
        raise DialogueError(row.where, row.field, row.problem)
    if not isinstance(row, dict):
        raise DialogueError(loc.where, None, f"expected a mapping with id, persona and turns, got {show(row)}")
    check_keys(row, _DIALOGUE_KEYS, loc, error=DialogueError)
    persona = _persona(row.get("persona"), loc, known)
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns:
        got = "missing" if turns is None else f"got {show(turns)}"
        raise DialogueError(loc.at("turns"), "turns", f"{got}; give a non-empty list of "
                                                      "{role, text, audio, codec_ids} turns")
    dialogue_id = row.get("id")
    if dialogue_id is not None and (isinstance(dialogue_id, bool) or not isinstance(dialogue_id, (str, int))):
        raise DialogueError(loc.at("id"), "id", f"must be a string or a number, got {show(dialogue_id)}")
    turns = tuple(_turn(t, loc, f"turns[{i}].", base) for i, t in enumerate(turns))
    try:
        return Dialogue(id=Path(loc.where).name if dialogue_id in (None, "") else str(dialogue_id),
                        persona=persona, turns=turns, meta={} if row.get("meta") is None else row["meta"])
    except DialogueError as e:
        raise loc.error(e) from None


def _persona(value: Any, loc: Located, known: dict) -> PersonaCard:
    if isinstance(value, str):
        if value not in known:
            names = ", ".join(sorted(known)[:8]) or "none were passed"
            raise DialogueError(loc.at("persona"), "persona", f"unknown persona id {value!r} (known: {names}); "
                                                              "pass its card in personas=, or give the card inline")
        return known[value][0]
    if not isinstance(value, dict):
        got = "missing" if value is None else f"got {show(value)}"
        raise DialogueError(loc.at("persona"), "persona", f"{got}; give a persona id or an inline card")
    try:
        card = card_from_row(value, loc, "persona.")
    except PersonaError as e:
        raise DialogueError(e.where, e.field, e.problem) from None
    if card.id in known and known[card.id][0] != card:
        raise DialogueError(loc.at("persona.id"), "persona.id", f"a different card with id {card.id!r} is "
                            f"already in {known[card.id][1]}; give this card another id")
    known.setdefault(card.id, (card, loc.at("persona")))
    return card


def _turn(row: Any, loc: Located, prefix: str, base: Path) -> Turn:
    if not isinstance(row, dict):
        raise DialogueError(loc.at(prefix[:-1]), prefix[:-1], f"expected a mapping like "
                                                              f'{{"role": "user", "text": ...}}, got {show(row)}')
    check_keys(row, _TURN_KEYS, loc, prefix, DialogueError)
    values = {k: v for k, v in row.items() if v is not None}
    audio = values.get("audio")
    if isinstance(audio, str) and audio:
        values["audio"] = os.path.normpath(os.path.join(base, audio))
        if not os.path.isfile(values["audio"]):
            raise DialogueError(loc.at(f"{prefix}audio"), f"{prefix}audio", f"file not found: {values['audio']} "
                                                                           f"(relative paths start from {base})")
    try:
        return Turn(**values)
    except DialogueError as e:
        raise loc.error(e, prefix) from None
    except TypeError as e:  # no role given
        raise DialogueError(loc.at(prefix[:-1]), f"{prefix}role", f"missing; use one of {list(ROLES)}") from e


# --- writing ----------------------------------------------------------------------------------------
def write_dialogues(path: str | Path, dialogues: Iterable[Dialogue], *, inline_personas: bool = False) -> Path:
    """Write JSONL that `read_dialogues` reads back equal, audio paths relative to the file's folder.
    Personas are written as ids (read back with `personas=` the same cards) unless `inline_personas`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.absolute().parent
    lines = []
    for d in dialogues:
        row = {"id": d.id, "persona": card_to_row(d.persona) if inline_personas else d.persona.id,
               "turns": [_turn_row(t, base) for t in d.turns]}
        if d.meta:
            row["meta"] = d.meta
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    return write_text_atomic(path, "".join(lines))


def _turn_row(turn: Turn, base: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"role": turn.role}
    if turn.text is not None:
        row["text"] = turn.text
    if turn.audio is not None:
        row["audio"] = os.path.relpath(turn.audio, base)
    if turn.codec_ids is not None:
        row["codec_ids"] = list(turn.codec_ids)
    if turn.meta:
        row["meta"] = turn.meta
    return row


# --- speaking the user's turns ----------------------------------------------------------------------
def synthesize_user_turns(dialogues: Iterable[Dialogue], out_dir: str | Path, *,
                          voices: tuple[str, ...] = USER_VOICES, rate: int = 175, pitch: int = 50,
                          sample_rate: int = 16000) -> list[Dialogue]:
    """The dialogues with every text-only user turn given audio: espeak-ng speech, 16-bit wav at
    `sample_rate` in `out_dir`, in one voice per dialogue (picked from `voices` by its id). A wav is
    named by a hash of its text and settings, so one already on disk is reused: the work is done
    once, whoever asks again. Turns that have audio are left as they are."""
    if not voices:
        raise ValueError("voices is empty; give at least one espeak-ng voice, e.g. ('en-us',)")
    out_dir = Path(out_dir).absolute()
    out, made, reused = [], 0, 0
    dialogues = list(dialogues)
    # disable=None: the bar shows on a terminal and stays out of CI logs.
    for d in tqdm(dialogues, desc="speaking user turns", unit="dialogue", disable=None):
        voice = voices[zlib.crc32(d.id.encode("utf-8")) % len(voices)]
        turns = []
        for turn in d.turns:
            if turn.role == "user" and turn.audio is None:
                wav, new = spoken_wav(turn.text, out_dir, voice=voice, rate=rate, pitch=pitch, sample_rate=sample_rate)
                made, reused = made + new, reused + (not new)
                turn = replace(turn, audio=str(wav))
            turns.append(turn)
        out.append(replace(d, turns=tuple(turns)))
    log.info("%s: spoke %d user turns, reused %d", out_dir, made, reused)
    return out


def spoken_wav(text: str, out_dir: str | Path, *, voice: str, rate: int = 175, pitch: int = 50,
               sample_rate: int = 16000) -> tuple[Path, bool]:
    """`text` spoken by espeak-ng as a 16-bit wav in `out_dir`, named by a hash of the text and the
    settings; one already there is reused. Returns (path, whether it was made now)."""
    from speechrl.data import synth  # loads libespeak-ng; only callers that speak need it
    from speechrl.data.audio import write_wav

    settings = f"{synth.BUILDER_VERSION}|{text}|{voice}|{rate}|{pitch}|{sample_rate}"
    wav = Path(out_dir) / f"{hashlib.sha1(settings.encode('utf-8')).hexdigest()[:16]}.wav"
    if wav.is_file():  # written atomically, so a wav on disk is whole
        return wav, False
    write_wav(wav, synth.synthesize(text, voice, rate, pitch, sample_rate), sample_rate)
    return wav, True


# --- codec ids against the recipe's codec -----------------------------------------------------------
def check_codec_ids(dialogues: Iterable[Dialogue], codec: AudioCodec, *, on_bad: OnBad = "skip") -> CheckedList:
    """The dialogues whose assistant codec ids fit `codec` (each id in its codebook's range, whole
    frames); ids made by another codec are caught here, before training, not as garbage audio."""
    from speechrl.rollouts.codec import unflatten_ids

    def check(d: Dialogue) -> Dialogue:
        for i, turn in enumerate(d.turns):
            if turn.codec_ids is not None:
                try:
                    unflatten_ids(turn.codec_ids, codec.num_codebooks, codec.codebook_size, "codec_ids")
                except ValueError as e:
                    raise DialogueError(f"dialogue {d.id!r}", f"turns[{i}].codec_ids",
                                        f"{e}; re-encode the reply's audio with the recipe's codec") from e
        return d

    return keep_good(dialogues, check, on_bad, "dialogues")
