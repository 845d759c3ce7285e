"""The shared real recordings read per folder, transcripts as their sources give them."""
from __future__ import annotations

import pytest

from speechrl.data.manifest import SpeechDataset
from speechrl.data.real_speech import FOLDERS, real_speech_examples

pytestmark = pytest.mark.realdata


def test_every_folder_is_read_with_its_transcripts(shared_data):
    found = real_speech_examples(shared_data / "real_speech")
    assert list(found) == list(FOLDERS)
    assert {k: len(v) for k, v in found.items()} == {"librivox": 5, "cards": 5, "speechbrain_asr": 10, "misc": 3}
    texts = {e.id: e.text for v in found.values() for e in v}
    assert texts["cards/001"] == "ten of clubs"
    assert texts["speechbrain_asr/spk1_snt2"] == "DROP THE TUE WHEN YOU ADD THE FIGURES"  # spelled as given
    assert texts["librivox/austen-0880"] == "he was not an ill disposed young man"
    assert texts["misc/goforward.raw"] == "go forward ten meters"  # from SOURCES.md's table
    assert texts["misc/jfk.flac"].startswith("And so my fellow Americans")


def test_every_clip_decodes_including_the_headerless_raw(shared_data):
    found = real_speech_examples(shared_data / "real_speech")
    for name, examples in found.items():
        ds = SpeechDataset(examples, 16000, on_bad="fail")
        assert len(ds) == len(examples), name
    raw = SpeechDataset(found["misc"][:1], 16000)[0][1]
    assert 1.0 < len(raw) / 16000 < 5.0  # "go forward ten meters", 16 kHz int16


def test_a_missing_folder_says_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="librivox/, cards/"):
        real_speech_examples(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds transcribed clips"):
        real_speech_examples(tmp_path / "empty")
