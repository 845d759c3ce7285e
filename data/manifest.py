"""Speech examples as immutable records, read from and written to manifests (lhotse-style).

A manifest is JSONL, CSV or a `datasets.save_to_disk` folder with a `text` column and an `audio`
(path) or `audio_bytes` column. Reading checks the *structure* (and fails loudly, naming file and
line); whether each example's audio and text are usable is decided once, up front, by
`SpeechDataset`, which reports bad examples instead of crashing on them mid-training.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from speechrl.data.audio import BadExample, load_audio
from speechrl.data.files import write_text_atomic

log = logging.getLogger(__name__)

_FIELDS = ("id", "text", "audio", "audio_bytes", "speaker", "persona")


class ManifestError(ValueError):
    """The manifest itself is malformed (bad JSON, missing column): fix the file."""


@dataclass(frozen=True)
class Example:
    """One utterance. `audio` is an absolute path; `extra` holds the manifest's other columns."""

    id: str
    text: str
    audio: str | None = None
    audio_bytes: bytes | None = field(default=None, repr=False)
    speaker: str | None = None
    persona: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def source(self) -> str:
        """What error reports name: the audio path, else the id."""
        return self.audio or self.id


def read_manifest(source: str | Path) -> list[Example]:
    """Read a .jsonl/.csv manifest or a `save_to_disk` folder; relative audio paths are resolved
    against the folder holding the manifest."""
    path = Path(source)
    if path.is_dir():
        rows = hf_rows(path)
    elif not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    elif path.suffix in (".jsonl", ".json"):
        rows = jsonl_rows(path)
    elif path.suffix == ".csv":
        rows = _csv_rows(path)
    else:
        raise ManifestError(
            f"{path}: unknown manifest type {path.suffix!r}; use .jsonl, .csv or a save_to_disk folder"
        )
    base = path.absolute().parent
    examples, seen = [], {}
    for index, (where, row) in enumerate(rows):
        ex = _example(row, where, base, default_id=f"{path.stem}-{index}")
        if ex.id in seen:
            raise ManifestError(f"{where}: duplicate id {ex.id!r} (first at {seen[ex.id]})")
        seen[ex.id] = where
        examples.append(ex)
    return examples


def jsonl_rows(path: Path):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(row, dict):
                raise ManifestError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _csv_rows(path: Path):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            where = f"{path}:{reader.line_num}"
            # DictReader files surplus cells under None and fills missing ones with None.
            if None in row or None in row.values():
                raise ManifestError(f"{where}: row has a different number of cells than the header")
            # An empty CSV cell means "no value" for optional fields.
            yield where, {k: (v if v != "" or k == "text" else None) for k, v in row.items()}


def hf_rows(path: Path):
    import datasets  # slow import; only manifests saved by `datasets` need it

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise ManifestError(f"{path}: not a datasets.save_to_disk folder ({e})") from e
    if isinstance(ds, datasets.DatasetDict):
        raise ManifestError(f"{path}: holds splits {list(ds)}; pass one split's folder")
    # Decoding Audio needs torchcodec (absent here); we decode the raw bytes ourselves.
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Audio):
            ds = ds.cast_column(name, datasets.Audio(decode=False))
    for index, row in enumerate(ds):
        yield f"{path}[row {index}]", row


def _example(row: dict, where: str, base: Path, default_id: str) -> Example:
    if "text" not in row:
        raise ManifestError(f"{where}: missing column 'text' (columns: {sorted(row)})")
    text = row["text"]
    if text is None:
        text = ""  # a null label is reported as empty text by SpeechDataset, like a bad clip
    if not isinstance(text, str):
        raise ManifestError(f"{where}: field 'text' must be a string, got {text!r}")
    audio, audio_bytes = row.get("audio"), row.get("audio_bytes")
    if isinstance(audio, dict):  # datasets Audio(decode=False): {"bytes": ..., "path": ...}
        if audio.get("bytes"):  # save_to_disk embeds the bytes; the path is only a file name
            default_id = Path(audio["path"]).stem if audio.get("path") else default_id
            audio, audio_bytes = None, audio["bytes"]
        else:
            audio = audio.get("path")
    if audio is None and audio_bytes is None:
        raise ManifestError(f"{where}: needs an 'audio' (path) or 'audio_bytes' value")
    if audio is not None:
        if not isinstance(audio, str) or not audio:
            raise ManifestError(f"{where}: field 'audio' must be a file path, got {audio!r}")
        audio = os.path.normpath(os.path.join(base, audio))
    ex_id = row.get("id")
    if ex_id is None or ex_id == "":
        ex_id = Path(audio).stem if audio else default_id
    return Example(
        id=str(ex_id),
        text=text,
        audio=audio,
        audio_bytes=audio_bytes,
        speaker=None if row.get("speaker") is None else str(row["speaker"]),
        persona=None if row.get("persona") is None else str(row["persona"]),
        extra={k: v for k, v in row.items() if k not in _FIELDS},
    )


def write_manifest(path: str | Path, examples: Iterable[Example]) -> Path:
    """Write JSONL with audio paths relative to the manifest's folder (movable as one folder);
    `datasets.load_dataset("json", data_files=path)` loads it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.absolute().parent
    lines = []
    for ex in examples:
        if ex.audio is None:
            raise ValueError(f"example {ex.id!r} holds audio_bytes only; write it to a wav first")
        clash = set(ex.extra) & set(_FIELDS)
        if clash:
            raise ValueError(f"example {ex.id!r}: extra keys {sorted(clash)} clash with fields")
        row = {"id": ex.id, "text": ex.text, "audio": os.path.relpath(ex.audio, base),
               "speaker": ex.speaker, "persona": ex.persona, **ex.extra}
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    return write_text_atomic(path, "".join(lines))


def load_example(
    example: Example,
    sample_rate: int = 16000,
    *,
    min_seconds: float = 0.2,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Decode one example's audio; BadExample if its text is empty or its audio is unusable."""
    if not example.text.strip():
        raise BadExample(example.source, "field 'text' is empty")
    return load_audio(
        example.audio if example.audio is not None else example.audio_bytes,
        sample_rate,
        min_seconds=min_seconds,
        max_seconds=max_seconds,
        name=example.source,
    )


class SpeechDataset:
    """Good examples decoded once up front, as `(example, audio)` pairs; bad ones in `.bad`.

    Decoding everything at start-up costs memory (16 kHz float32: ~230 MB per hour of audio) but
    means a broken clip is reported before training starts, not as a crash hours in.
    """

    def __init__(
        self,
        examples: Iterable[Example],
        sample_rate: int = 16000,
        *,
        min_seconds: float = 0.2,
        max_seconds: float | None = None,
        on_bad: Literal["skip", "fail"] = "skip",
    ):
        if on_bad not in ("skip", "fail"):
            raise ValueError(f"on_bad must be 'skip' or 'fail', got {on_bad!r}")
        self.sample_rate = sample_rate
        self.items: list[tuple[Example, np.ndarray]] = []
        self.bad: list[BadExample] = []
        examples = list(examples)
        # disable=None: the bar shows on a terminal and stays out of CI logs.
        for ex in tqdm(examples, desc="decoding audio", unit="clip", disable=None):
            try:
                audio = load_example(ex, sample_rate, min_seconds=min_seconds, max_seconds=max_seconds)
            except BadExample as e:
                if on_bad == "fail":
                    raise
                log.warning("skipping bad example %s", e)
                self.bad.append(e)
                continue
            self.items.append((ex, audio))
        self.num_examples = len(examples)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Example, np.ndarray]:
        return self.items[index]

    def summary(self) -> dict[str, Any]:
        """Counts, and one "<source>: <reason>" line per bad example."""
        return {
            "examples": self.num_examples,
            "kept": len(self.items),
            "bad": len(self.bad),
            "reasons": [str(e) for e in self.bad],
        }
