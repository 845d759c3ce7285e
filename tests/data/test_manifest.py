"""Manifests (jsonl / csv / save_to_disk) and SpeechDataset's up-front validation."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from speechrl.data.audio import BadExample, write_wav
from speechrl.data.manifest import (
    Example, ManifestError, SpeechDataset, load_example, read_manifest, write_manifest,
)


@pytest.fixture
def clips(tmp_path):
    """Three 0.5 s tones at different pitches, as 16 kHz wavs under tmp_path/wavs."""
    t = np.arange(8000) / 16000
    paths = []
    for i, freq in enumerate((200, 300, 400)):
        paths.append(write_wav(tmp_path / "wavs" / f"c{i}.wav", 0.3 * np.sin(2 * np.pi * freq * t), 16000))
    return paths


def test_jsonl_round_trip_with_relative_paths(tmp_path, clips):
    examples = [
        Example(id=f"e{i}", text=f"say {i}", audio=str(p), speaker="s1" if i else None,
                extra={"emotion": "calm", "score": i})
        for i, p in enumerate(clips)
    ]
    path = write_manifest(tmp_path / "m" / "train.jsonl", examples)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["audio"] == "../wavs/c0.wav" and rows[0]["emotion"] == "calm"
    assert read_manifest(path) == examples


def test_written_manifest_loads_in_hf_datasets(tmp_path, clips):
    import datasets

    examples = [Example(id=f"e{i}", text="go", audio=str(p)) for i, p in enumerate(clips)]
    path = write_manifest(tmp_path / "train.jsonl", examples)
    ds = datasets.load_dataset("json", data_files=str(path), split="train",
                               cache_dir=str(tmp_path / "hf_cache"))
    assert ds.num_rows == 3 and ds[1]["audio"] == "wavs/c1.wav" and ds[2]["id"] == "e2"


def test_csv_manifest(tmp_path, clips):
    (tmp_path / "m.csv").write_text(
        "audio,text,speaker,lang\n"
        "wavs/c0.wav,hello there,,en\n"
        "wavs/c1.wav,\"one, two\",bob,en\n"
    )
    a, b = read_manifest(tmp_path / "m.csv")
    assert a.id == "c0" and a.audio == str(clips[0]) and a.speaker is None
    assert b.text == "one, two" and b.speaker == "bob" and b.extra == {"lang": "en"}


@pytest.mark.parametrize("as_audio_feature", [True, False])
def test_hf_save_to_disk_manifest(tmp_path, clips, as_audio_feature):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "audio": [str(p) for p in clips]})
    if as_audio_feature:
        ds = ds.cast_column("audio", datasets.Audio(sampling_rate=16000))
    ds.save_to_disk(str(tmp_path / "hf"))
    examples = read_manifest(tmp_path / "hf")
    assert [e.text for e in examples] == ["a", "b", "c"]
    assert [e.id for e in examples] == ["c0", "c1", "c2"]
    if as_audio_feature:  # save_to_disk embedded the audio itself
        assert examples[0].audio is None and examples[0].audio_bytes == clips[0].read_bytes()
    else:
        assert examples[0].audio == str(clips[0]) and examples[0].audio_bytes is None
    data = SpeechDataset(examples)
    assert len(data) == 3
    np.testing.assert_allclose(data[2][1], load_example(Example("x", "c", audio=str(clips[2]))))


def test_speechbrain_manifest_loads(shared_data):
    examples = read_manifest(shared_data / "real_speech" / "speechbrain_asr" / "manifest.jsonl")
    assert len(examples) == 10
    assert examples[1].text == "DROP THE TUE WHEN YOU ADD THE FIGURES"  # kept as given
    assert {e.speaker for e in examples} == {"spk1", "spk2"}
    assert examples[0].extra == {"emotion": "anger"}
    data = SpeechDataset(examples)
    assert data.summary()["kept"] == 10 and data.sample_rate == 16000


@pytest.mark.parametrize("name, content, message", [
    ("m.jsonl", '{"text": "a", "audio": "x.wav"}\n{"text": "b", audio}\n', "m.jsonl:2: not valid JSON"),
    ("m.jsonl", '{"text": "a", "audio": "x.wav"}\n\n{"audio": "y.wav"}\n', "m.jsonl:3: missing column 'text'"),
    ("m.jsonl", '{"text": "a"}\n', "m.jsonl:1: needs an 'audio'"),
    ("m.jsonl", '["a", "x.wav"]\n', "m.jsonl:1: expected a JSON object"),
    ("m.jsonl", '{"text": "a", "audio": "x.wav"}\n{"text": "b", "audio": "x.wav"}\n',
     "m.jsonl:2: duplicate id 'x'"),
    ("m.csv", "audio,text\nx.wav,a\ny.wav,b,extra\n", "m.csv:3: row has a different number"),
    ("m.txt", "x.wav a\n", "unknown manifest type '.txt'"),
])
def test_malformed_manifests_name_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path / name)


def test_bad_examples_are_reported_and_skipped(shared_data, tmp_path, clips, caplog):
    awful = shared_data / "real_speech" / "malformed" / "awful.wav"
    long_clip = write_wav(tmp_path / "long.wav", 0.3 * np.ones(16000 * 3), 16000)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"text": "good", "audio": str(clips[0])},
        {"text": "wrong rate", "audio": str(awful)},
        {"text": "too long", "audio": "long.wav"},
        {"text": "  ", "audio": str(clips[1])},
        {"text": "missing", "audio": "nowhere.wav"},
        {"text": "good too", "audio": str(clips[2])},
    ]))
    examples = read_manifest(tmp_path / "m.jsonl")
    with caplog.at_level(logging.WARNING):
        data = SpeechDataset(examples, max_seconds=2.0)
    assert [ex.text for ex, _ in data] == ["good", "good too"]
    summary = data.summary()
    assert (summary["examples"], summary["kept"], summary["bad"]) == (6, 2, 4)
    expected = [
        (str(awful), "1092676 Hz"), (str(long_clip), "too long"),
        (str(clips[1]), "field 'text' is empty"), (str(tmp_path / "nowhere.wav"), "file not found"),
    ]
    for bad, line, (source, reason) in zip(data.bad, summary["reasons"], expected):
        assert bad.source == source and reason in bad.reason and line.startswith(source)
        assert any(source in r.getMessage() and reason in r.getMessage() for r in caplog.records)

    with pytest.raises(BadExample, match="1092676 Hz"):
        SpeechDataset(examples, max_seconds=2.0, on_bad="fail")
    with pytest.raises(ValueError, match="on_bad"):
        SpeechDataset(examples, on_bad="ignore")
