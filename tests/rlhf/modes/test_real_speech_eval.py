"""Real-recording evaluation: corpus-level rates per folder, and Whisper tiny.en's reference row."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from speechrl.rlhf.modes.real_speech import load_folders, real_speech_report, score


@pytest.fixture(scope="module")
def folders(shared_data):
    return load_folders(shared_data / "real_speech", 16000, None)


@pytest.mark.realdata
def test_rates_are_corpus_level(folders):
    refs = [ex.text for ds in folders.values() for ex, _ in ds]
    it = iter(refs)
    exact = score(lambda audios: [next(it) for _ in audios], folders)
    assert exact["all"]["wer"] == 0 and all(r["wer"] == 0 for r in exact["folders"].values())
    silent = score(lambda audios: ["" for _ in audios], folders)
    assert silent["all"]["wer"] == 1.0 and silent["all"]["clips"] == len(refs) == 23
    # one wrong word in the 3-word "ten of clubs": 1 error over the folder's words, not a mean of clip rates
    it = iter(refs)
    one = score(lambda audios: [("ten of hearts" if r == "ten of clubs" else r) for r in (next(it) for _ in audios)],
                folders)
    words = sum(len(ex.text.split()) for ex, _ in folders["cards"])
    assert one["folders"]["cards"]["wer"] == pytest.approx(1 / words)


@pytest.mark.realdata
def test_too_long_clips_are_skipped_and_counted(shared_data):
    short = load_folders(shared_data / "real_speech", 16000, 4.0)
    assert 0 < sum(len(ds.bad) for ds in short.values()) < 23
    assert all("too long" in b.reason for ds in short.values() for b in ds.bad)


@pytest.mark.realdata
def test_whisper_reference_row_on_the_real_clips(folders, shared_data, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    it = iter([ex.text for ds in folders.values() for ex, _ in ds])
    text, rows = real_speech_report(lambda audios: [next(it) for _ in audios], "references", shared_data / "real_speech",
                                    sample_rate=16000, max_seconds=None, cache_dir=cache, out_dir=cache / "eval")
    whisper = rows["whisper-tiny.en"]
    assert whisper["folders"]["librivox"]["wer"] < 0.1 and whisper["all"]["wer"] < 0.2
    assert "| librivox | 5 |" in text and "| **all** | 23 |" in text
    saved = json.loads((cache / "eval" / "real_speech.json").read_text())
    assert {c["id"] for c in saved["whisper-tiny.en"]["clips"]} >= {"misc/jfk.flac", "cards/001"}


def test_real_speech_needs_a_mode_that_transcribes(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    out = subprocess.run([sys.executable, "-m", "speechrl.rlhf.cli.main", "eval", str(tmp_path), "--recipe",
                          "realtime/ppo", "--real-speech"], capture_output=True, text=True)
    assert out.returncode == 2 and "does not transcribe" in out.stderr
