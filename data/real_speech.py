"""The shared real recordings (`../shared/data/real_speech`, see its SOURCES.md) as examples, by folder.

Each folder keeps its transcripts its own way; this reads them as given, spelling included:
- `librivox/`: `<stem>.txt` beside each `<stem>.wav`;
- `cards/`: `cards.transcription`, lines `<s> text </s> (NNN)` for `NNN.wav`;
- `speechbrain_asr/`: `manifest.jsonl` rows `{id, audio, text, ...}`;
- `misc/`: one clip per file, transcribed only in SOURCES.md's table (the quoted text of its row).
  `goforward.raw` is headerless 16 kHz mono int16, wrapped as WAV bytes here.
`malformed/` holds broken files, not speech: it is not an evaluation folder.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np

from speechrl.data.manifest import Example

FOLDERS = ("librivox", "cards", "speechbrain_asr", "misc")
RAW_RATE = 16000  # goforward.raw, per SOURCES.md
_CARD = re.compile(r"<s>\s*(.*?)\s*</s>\s*\((\w+)\)")
_SOURCES_ROW = re.compile(r"^\|\s*`real_speech/misc/([^`]+)`\s*\|(.*)$")
_QUOTED = re.compile(r'"([^"]+)"')


def default_real_speech_dir() -> Path | None:
    """`../shared/data/real_speech` beside the working directory or the package checkout, if present."""
    here = Path(__file__).resolve().parents[1]  # the checkout root (data/ lives at the top level)
    for base in (Path.cwd(), here):
        path = base.parent / "shared" / "data" / "real_speech"
        if path.is_dir():
            return path
    return None


def _librivox(folder: Path) -> list[Example]:
    return [Example(id=f"librivox/{wav.stem}", text=wav.with_suffix(".txt").read_text(encoding="utf-8").strip(),
                    audio=str(wav)) for wav in sorted(folder.glob("*.wav")) if wav.with_suffix(".txt").is_file()]


def _cards(folder: Path) -> list[Example]:
    out = []
    for line in (folder / "cards.transcription").read_text(encoding="utf-8").splitlines():
        m = _CARD.search(line)
        if m and (folder / f"{m.group(2)}.wav").is_file():
            out.append(Example(id=f"cards/{m.group(2)}", text=m.group(1), audio=str(folder / f"{m.group(2)}.wav")))
    return out


def _speechbrain(folder: Path) -> list[Example]:
    out = []
    for line in (folder / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out.append(Example(id=f"speechbrain_asr/{row['id']}", text=row["text"], audio=str(folder / row["audio"]),
                               speaker=row.get("speaker")))
    return out


def _raw_as_wav(path: Path) -> bytes:
    import soundfile as sf

    pcm = np.fromfile(path, dtype="<i2")
    buf = io.BytesIO()
    sf.write(buf, pcm, RAW_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _misc(folder: Path) -> list[Example]:
    sources = folder.parent.parent / "SOURCES.md"
    if not sources.is_file():
        return []
    out = []
    for line in sources.read_text(encoding="utf-8").splitlines():
        row, quoted = _SOURCES_ROW.match(line), None
        if row:
            quoted = _QUOTED.search(row.group(2))
        path = folder / row.group(1) if row else None
        if quoted and path.is_file():
            if path.suffix == ".raw":
                out.append(Example(id=f"misc/{path.name}", text=quoted.group(1), audio_bytes=_raw_as_wav(path)))
            else:
                out.append(Example(id=f"misc/{path.name}", text=quoted.group(1), audio=str(path)))
    return out


_READERS = {"librivox": _librivox, "cards": _cards, "speechbrain_asr": _speechbrain, "misc": _misc}


def real_speech_examples(root: str | Path) -> dict[str, list[Example]]:
    """{folder: examples} for each evaluation folder present under `root`, in FOLDERS order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no real-speech folder here (expected ../shared/data/real_speech "
                                "with librivox/, cards/, speechbrain_asr/, misc/)")
    found = {name: _READERS[name](root / name) for name in FOLDERS if (root / name).is_dir()}
    found = {name: examples for name, examples in found.items() if examples}
    if not found:
        raise FileNotFoundError(f"{root}: none of {', '.join(FOLDERS)} holds transcribed clips")
    return found
