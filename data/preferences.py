"""Preference pairs for TTS DPO: for one text, the better and the worse of two spoken renderings.

docs/preferences.md is the format. Rows are checked as read (errors name file, line and field) and
`encode_pairs` turns audio into the recipe codec's ids once, up front; a bad row or undecodable clip
costs only its pair (on_bad="skip": kept in `.bad`) or stops the read (on_bad="fail").
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from tqdm import tqdm

from speechrl.data.audio import BadExample, load_audio
from speechrl.data.errors import FieldError, show
from speechrl.data.manifest import ManifestError, hf_rows
from speechrl.data.files import write_text_atomic

if TYPE_CHECKING:  # the codec module imports torch; reading pairs should not
    from speechrl.rollouts.codec import AudioCodec

log = logging.getLogger(__name__)

MODES = ("tts",)  # what a pair may be for; pairs of other modes would be added here
_FIELDS = ("id", "text", "voice", "chosen", "rejected", "annotator", "reason", "mode")
_SIDE_SHAPES = 'an audio path, {"audio": path} or {"codec_ids": [int, ...]}'


class PreferenceError(FieldError):
    """One pair is unusable: `where` (file:line, or the pair's id), `field` (or None) and why."""


@dataclass(frozen=True)
class Speech:
    """One side of a pair: an audio file (absolute path) or codec-local ids; exactly one of them."""

    audio: str | None = None
    codec_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        if (self.audio is None) == (self.codec_ids is None):
            raise ValueError(f"Speech needs exactly one of audio or codec_ids, got {self}")


@dataclass(frozen=True)
class PreferencePair:
    """`chosen` said `text` better than `rejected`; `voice` (absolute path) is the voice to speak in.
    `extra` holds the row's other columns."""

    id: str
    text: str
    chosen: Speech
    rejected: Speech
    voice: str | None = None
    annotator: str | None = None
    reason: str | tuple[str, ...] | None = None  # free text, or tags
    mode: str = "tts"
    extra: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, eq=False)
class EncodedPair:
    """A pair as the trainer consumes it: int64 codec-local ids, read-only (shared between the
    pairs that name the same file)."""

    pair: PreferencePair
    chosen: np.ndarray
    rejected: np.ndarray
    voice: np.ndarray | None = None


class PairList(list):
    """The pairs that passed, in order; those that did not are in `.bad`."""

    def __init__(self, kept: Iterable, bad: list[PreferenceError], num_pairs: int):
        super().__init__(kept)
        self.bad = bad
        self.num_pairs = num_pairs

    def summary(self) -> dict[str, Any]:
        """Counts, and one "<where>: <reason>" line per bad pair."""
        return {"pairs": self.num_pairs, "kept": len(self), "bad": len(self.bad),
                "reasons": [str(e) for e in self.bad]}


OnBad = Literal["skip", "fail"]


def keep_good(items: list, make: Callable[[Any], Any], on_bad: OnBad, desc: str | None = None) -> PairList:
    """make(item) for each item; a PreferenceError drops the item (skip) or is raised (fail)."""
    if on_bad not in ("skip", "fail"):
        raise ValueError(f"on_bad must be 'skip' or 'fail', got {on_bad!r}")
    kept, bad = [], []
    # disable=None: the bar shows on a terminal and stays out of CI logs.
    for item in tqdm(items, desc=desc, unit="pair", disable=None if desc else True):
        try:
            kept.append(make(item))
        except PreferenceError as e:
            if on_bad == "fail":
                raise
            log.warning("skipping bad preference pair %s", e)
            bad.append(e)
    return PairList(kept, bad, len(items))


# --- reading -------------------------------------------------------------------------------------
def read_preferences(source: str | Path, *, on_bad: OnBad = "skip") -> PairList:
    """Read a .jsonl file or a `save_to_disk` folder of pairs (a list of PreferencePair, with
    `.bad` and `.summary()`); relative paths resolve against the folder holding it."""
    path = Path(source)
    if path.is_dir():
        try:
            rows = list(hf_rows(path))
        except ManifestError as e:
            raise PreferenceError(str(path), None, str(e).removeprefix(f"{path}: ")) from e
    elif not path.is_file():
        raise FileNotFoundError(f"preference file {path} does not exist")
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            rows = [(f"{path}:{n}", line) for n, line in enumerate(f, 1) if line.strip()]
    else:
        raise PreferenceError(str(path), None, f"unknown file type {path.suffix!r}; "
                                               "write pairs as .jsonl or a datasets save_to_disk folder")
    base, seen = path.absolute().parent, {}

    def make(item) -> PreferencePair:
        where, row = item
        pair = _pair(_as_object(row, where), where, base)
        if pair.id in seen:
            raise PreferenceError(where, "id", f"duplicate id {pair.id!r} (first at {seen[pair.id]}); "
                                               "give each pair its own id")
        seen[pair.id] = where
        return pair

    return keep_good(rows, make, on_bad)


def _as_object(row: str | dict, where: str) -> dict:
    if isinstance(row, str):  # a JSONL line
        try:
            row = json.loads(row)
        except json.JSONDecodeError as e:
            raise PreferenceError(where, None, f"not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(row, dict):
        raise PreferenceError(where, None, f"expected a JSON object, got {type(row).__name__}")
    return row


def _pair(row: dict, where: str, base: Path) -> PreferencePair:
    mode = "tts" if row.get("mode") is None else row["mode"]
    if mode not in MODES:
        raise PreferenceError(where, "mode", f"{show(mode)} is not supported; only {list(MODES)} pairs "
                                             "(text in, audio out) can be read for now")
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        got = "missing" if text is None else "empty" if isinstance(text, str) else f"not a string: {show(text)}"
        raise PreferenceError(where, "text", f"{got}; give the sentence the TTS should say")
    chosen, rejected = (_speech(row.get(name), where, name, base) for name in ("chosen", "rejected"))
    if chosen == rejected:
        same = f"audio as 'chosen' ({chosen.audio})" if chosen.audio else "codec ids as 'chosen'"
        raise PreferenceError(where, "rejected", f"same {same}; a pair needs two different renderings")
    pair_id = row.get("id")
    if pair_id is not None and not isinstance(pair_id, (str, int)):
        raise PreferenceError(where, "id", f"must be a string or a number, got {show(pair_id)}")
    return PreferencePair(
        id=Path(where).name if pair_id in (None, "") else str(pair_id),
        text=text,
        chosen=chosen,
        rejected=rejected,
        voice=None if row.get("voice") is None else _file(row["voice"], where, "voice", base),
        annotator=_optional_str(row.get("annotator"), where, "annotator"),
        reason=_reason(row.get("reason"), where),
        mode=mode,
        extra={k: v for k, v in row.items() if k not in _FIELDS},
    )


def _speech(value: Any, where: str, name: str, base: Path) -> Speech:
    if value is None:
        raise PreferenceError(where, name, f"missing; give {_SIDE_SHAPES}")
    if isinstance(value, str):
        return Speech(audio=_file(value, where, name, base))
    if not isinstance(value, dict):
        raise PreferenceError(where, name, f"got {show(value)}; give {_SIDE_SHAPES}")
    given = {k: v for k, v in value.items() if v is not None}  # datasets fills a struct's absent keys with None
    if set(given) == {"audio"}:
        return Speech(audio=_file(given["audio"], where, name, base))
    if set(given) == {"codec_ids"}:
        return Speech(codec_ids=_codec_ids(given["codec_ids"], where, name))
    hint = " (embedded audio bytes: save the clips as files and give their paths)" if "bytes" in given else ""
    raise PreferenceError(where, name, f"has keys {sorted(given)}; give {_SIDE_SHAPES}{hint}")


def _file(value: Any, where: str, name: str, base: Path) -> str:
    if not isinstance(value, str) or not value:
        raise PreferenceError(where, name, f"must be an audio file path, got {show(value)}")
    path = os.path.normpath(os.path.join(base, value))
    if not os.path.isfile(path):
        raise PreferenceError(where, name, f"file not found: {path} (relative paths start from {base})")
    return path


def _codec_ids(value: Any, where: str, name: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise PreferenceError(where, name, f"codec_ids must be a non-empty list of ints, got {show(value)}")
    for pos, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise PreferenceError(where, name, f"codec_ids[{pos}] is {v!r}; codec ids are ints >= 0 "
                                               "from the recipe codec's encode()")
    return tuple(int(v) for v in value)


def _optional_str(value: Any, where: str, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise PreferenceError(where, name, f"must be a string, got {show(value)}")
    return value


def _reason(value: Any, where: str) -> str | tuple[str, ...] | None:
    if isinstance(value, list) and all(isinstance(tag, str) for tag in value):
        return tuple(value)
    if value is not None and not isinstance(value, str):
        raise PreferenceError(where, "reason", f"must be a string or a list of strings (tags), got {show(value)}")
    return value


# --- writing -------------------------------------------------------------------------------------
def write_preferences(path: str | Path, pairs: Iterable[PreferencePair]) -> Path:
    """Write JSONL that `read_preferences` reads back equal, paths relative to the file's folder
    (movable as one folder); each side is written as an object, so that
    `datasets.load_dataset("json", data_files=path)` loads it too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.absolute().parent

    def side(s: Speech) -> dict:
        return {"audio": os.path.relpath(s.audio, base)} if s.audio else {"codec_ids": [int(i) for i in s.codec_ids]}

    lines = []
    for p in pairs:
        clash = set(p.extra) & set(_FIELDS)
        if clash:
            raise ValueError(f"pair {p.id!r}: extra keys {sorted(clash)} clash with fields")
        row = {"id": p.id, "text": p.text, "chosen": side(p.chosen), "rejected": side(p.rejected),
               "voice": p.voice and os.path.relpath(p.voice, base), "annotator": p.annotator,
               "reason": list(p.reason) if isinstance(p.reason, tuple) else p.reason, "mode": p.mode, **p.extra}
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    return write_text_atomic(path, "".join(lines))


# --- encoding ------------------------------------------------------------------------------------
def encode_pairs(pairs: Iterable[PreferencePair], codec: AudioCodec, *, on_bad: OnBad = "skip") -> PairList:
    """Each pair's chosen, rejected and voice as the codec's ids (a list of EncodedPair, with `.bad`
    and `.summary()`). Audio files are decoded at `codec.sample_rate` with `load_audio`, each file
    once per call; given codec ids are checked against the codec's id range and frame layout."""
    from speechrl.rollouts.codec import unflatten_ids

    encoded: dict[str, np.ndarray | BadExample] = {}  # audio path -> its ids, or why it cannot be read

    def ids(speech: Speech | str, pair: PreferencePair, name: str) -> np.ndarray:
        where = f"pair {pair.id!r}"
        path = speech if isinstance(speech, str) else speech.audio
        if path is None:
            out = np.asarray(speech.codec_ids, dtype=np.int64)
            try:  # every id in [0, codebook_size * num_codebooks), each in its codebook's slot
                unflatten_ids(out, codec.num_codebooks, codec.codebook_size, "codec_ids")
            except ValueError as e:
                raise PreferenceError(where, name, f"{e}; re-encode the audio with the recipe's codec") from e
            out.flags.writeable = False
            return out
        if path not in encoded:
            try:
                # no minimum length: a policy's sample that stopped early is short, and its judgment is
                # data all the same (0.2 s, the training-data default, dropped 9 of 21 judged pairs)
                audio = load_audio(path, codec.sample_rate, min_seconds=0.0)
                try:
                    out = np.asarray(codec.encode(audio, codec.sample_rate), np.int64)
                except ValueError as e:  # e.g. an empty file: nothing to encode
                    raise BadExample(path, str(e)) from e
                out.flags.writeable = False
                encoded[path] = out
            except BadExample as e:
                encoded[path] = e
        if isinstance(encoded[path], BadExample):
            raise PreferenceError(where, name, str(encoded[path]))
        return encoded[path]

    def encode(pair: PreferencePair) -> EncodedPair:
        voice = None if pair.voice is None else ids(pair.voice, pair, "voice")
        return EncodedPair(pair, ids(pair.chosen, pair, "chosen"), ids(pair.rejected, pair, "rejected"), voice)

    return keep_good(list(pairs), encode, on_bad, desc="encoding preference audio")
