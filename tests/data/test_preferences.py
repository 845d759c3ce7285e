"""Preference pairs for TTS DPO: the format (jsonl / save_to_disk), its checks, skip vs fail, and
encoding with a real (small) MelUnitCodec fit on espeak-ng speech."""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from speechrl.data.audio import load_audio, write_wav
from speechrl.data.preferences import (
    EncodedPair, PreferenceError, PreferencePair, Speech, encode_pairs, read_preferences, write_preferences,
)
from speechrl.data.synth import synthesize

SR = 16000
DOCS = Path(__file__).resolve().parents[2] / "docs" / "preferences.md"


@pytest.fixture(scope="module")
def wavs(tmp_path_factory) -> Path:
    """tmp/audio/{hello,goodbye,left}.wav (espeak-ng) and tmp/audio/broken.wav (not audio)."""
    root = tmp_path_factory.mktemp("prefs")
    for name, text in [("hello", "hello"), ("goodbye", "goodbye"), ("left", "turn left")]:
        write_wav(root / "audio" / f"{name}.wav", synthesize(text, "en-us", 175, 50, SR), SR)
    (root / "audio" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot a wav at all")
    return root


@pytest.fixture(scope="module")
def codec(wavs):
    """2 codebooks of 8 (16 ids): small enough to fit in well under a second."""
    from speechrl.rollouts.mel_codec import MelCodecConfig, MelUnitCodec

    clips = [load_audio(p, SR) for p in sorted((wavs / "audio").glob("[!b]*.wav"))]
    return MelUnitCodec.fit(clips, SR, MelCodecConfig(codebook_size=8, num_codebooks=2, max_fit_frames=2000))


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_round_trip_keeps_every_field_and_shape(wavs, tmp_path):
    audio = wavs / "audio"
    pairs = [
        PreferencePair("p1", "hello", Speech(audio=str(audio / "hello.wav")), Speech(codec_ids=(1, 9, 2, 10)),
                       voice=str(audio / "left.wav"), annotator="rater-1", reason=("clipped", "robotic"),
                       extra={"score": 0.5}),
        PreferencePair("p2", "goodbye", Speech(codec_ids=(3, 11)), Speech(audio=str(audio / "goodbye.wav")),
                       reason="drops a word", extra={"score": 1.0}),
    ]
    path = write_preferences(tmp_path / "out" / "pairs.jsonl", pairs)
    row = json.loads(path.read_text().splitlines()[0])
    assert row["chosen"] == {"audio": os.path.relpath(audio / "hello.wav", tmp_path / "out")}
    assert row["rejected"] == {"codec_ids": [1, 9, 2, 10]} and row["reason"] == ["clipped", "robotic"]
    back = read_preferences(path, on_bad="fail")
    assert back == pairs and back.summary() == {"pairs": 2, "kept": 2, "bad": 0, "reasons": []}


def test_written_file_loads_in_hf_datasets_and_back_from_save_to_disk(wavs, tmp_path):
    import datasets

    pairs = [PreferencePair(f"p{i}", "hello", Speech(audio=str(wavs / "audio" / "hello.wav")),
                            Speech(codec_ids=(i, 8 + i))) for i in range(3)]
    path = write_preferences(tmp_path / "pairs.jsonl", pairs)
    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf_cache"))
    ds.save_to_disk(str(tmp_path / "hf"))
    assert read_preferences(tmp_path / "hf", on_bad="fail") == pairs


def test_save_to_disk_folder_with_path_columns_and_default_ids(wavs, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["hello", "bye"], "chosen": ["audio/hello.wav", "audio/goodbye.wav"],
                                     "rejected": ["audio/left.wav", "audio/hello.wav"]})
    ds.save_to_disk(str(wavs / "hf"))  # relative paths start from the folder holding hf/
    a, b = read_preferences(wavs / "hf", on_bad="fail")
    assert (a.id, b.id) == ("hf[row 0]", "hf[row 1]")
    assert b.chosen == Speech(audio=str(wavs / "audio" / "goodbye.wav")) and b.mode == "tts"
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(PreferenceError, match=r"splits: holds splits \['train'\]; pass one split's folder"):
        read_preferences(tmp_path / "splits")


def test_default_id_is_file_and_line(wavs):
    path = write_rows(wavs / "ids.jsonl", ["", {"text": "a", "chosen": "audio/hello.wav", "rejected": "audio/left.wav"},
                                          {"id": 7, "text": "b", "chosen": "audio/hello.wav",
                                           "rejected": {"codec_ids": [0, 8]}}])
    assert [p.id for p in read_preferences(path, on_bad="fail")] == ["ids.jsonl:2", "7"]


GOOD = {"text": "hello", "chosen": "audio/hello.wav", "rejected": "audio/goodbye.wav"}


@pytest.mark.parametrize("row, field, message", [
    ({"chosen": "audio/hello.wav", "rejected": "audio/goodbye.wav"}, "text", "missing; give the sentence"),
    ({**GOOD, "text": "  "}, "text", "empty"),
    ({**GOOD, "text": 3}, "text", "not a string: 3"),
    ({**GOOD, "chosen": None}, "chosen", r"missing; give an audio path, \{\"audio\": path\} or"),
    ({k: v for k, v in GOOD.items() if k != "rejected"}, "rejected", "missing"),
    ({**GOOD, "chosen": 5}, "chosen", "got 5; give an audio path"),
    ({**GOOD, "chosen": {"audio": "audio/hello.wav", "codec_ids": [1]}}, "chosen", r"has keys \['audio', 'codec_ids'\]"),
    ({**GOOD, "chosen": {"bytes": "UklG", "path": "x.wav"}}, "chosen", r"has keys \['bytes', 'path'\].*\(embedded audio bytes: save the clips as files"),
    ({**GOOD, "rejected": "audio/nowhere.wav"}, "rejected", r"file not found: .*audio/nowhere.wav \(relative paths"),
    ({**GOOD, "rejected": {"audio": ""}}, "rejected", "must be an audio file path, got ''"),
    ({**GOOD, "rejected": "audio/hello.wav"}, "rejected", r"same audio as 'chosen' \(.*hello.wav\)"),
    ({**GOOD, "rejected": {"audio": "./audio/../audio/hello.wav"}}, "rejected", "same audio as 'chosen'"),
    ({**GOOD, "chosen": {"codec_ids": [1, 2]}, "rejected": {"codec_ids": [1, 2]}}, "rejected", "same codec ids"),
    ({**GOOD, "chosen": {"codec_ids": []}}, "chosen", r"codec_ids must be a non-empty list of ints, got \[\]"),
    ({**GOOD, "chosen": {"codec_ids": "1 2"}}, "chosen", "codec_ids must be a non-empty list of ints, got '1 2'"),
    ({**GOOD, "chosen": {"codec_ids": [1, 2.0]}}, "chosen", r"codec_ids\[1\] is 2.0; codec ids are ints >= 0"),
    ({**GOOD, "chosen": {"codec_ids": [1, -1]}}, "chosen", r"codec_ids\[1\] is -1"),
    ({**GOOD, "chosen": {"codec_ids": [True]}}, "chosen", r"codec_ids\[0\] is True"),
    ({**GOOD, "voice": "audio/none.wav"}, "voice", "file not found"),
    ({**GOOD, "annotator": 12}, "annotator", "must be a string, got 12"),
    ({**GOOD, "reason": ["ok", 1]}, "reason", r"must be a string or a list of strings \(tags\), got \['ok', 1\]"),
    ({**GOOD, "id": ["x"]}, "id", "must be a string or a number"),
    ({**GOOD, "mode": "asr"}, "mode", r"'asr' is not supported; only \['tts'\] pairs"),
])
def test_each_bad_field_is_named_with_file_and_line(wavs, row, field, message):
    path = write_rows(wavs / "bad.jsonl", [GOOD, row])
    with pytest.raises(PreferenceError, match=rf"bad.jsonl:2: field '{field}': {message}") as caught:
        read_preferences(path, on_bad="fail")
    assert caught.value.field == field and caught.value.where.endswith("bad.jsonl:2")


@pytest.mark.parametrize("line, message", [
    ("{not json", r"bad.jsonl:2: not valid JSON \(Expecting property name"),
    ('["a", "b"]', "bad.jsonl:2: expected a JSON object, got list"),
    (json.dumps({**GOOD, "id": "bad.jsonl:1"}), r"bad.jsonl:2: field 'id': duplicate id 'bad.jsonl:1' \(first at .*bad.jsonl:1\)"),
])
def test_bad_rows_without_a_field(wavs, line, message):
    with pytest.raises(PreferenceError, match=message):
        read_preferences(write_rows(wavs / "bad.jsonl", [GOOD, line]), on_bad="fail")


def test_skip_keeps_the_good_rows_and_reports_the_bad(wavs, caplog):
    path = write_rows(wavs / "mixed.jsonl", [
        {**GOOD, "id": "a"}, {**GOOD, "id": "b", "text": ""}, "{truncated", {**GOOD, "id": "c", "mode": "asr"},
        {**GOOD, "id": "d"},
    ])
    with caplog.at_level(logging.WARNING):
        pairs = read_preferences(path)  # on_bad="skip" is the default
    assert [p.id for p in pairs] == ["a", "d"]
    summary = pairs.summary()
    assert (summary["pairs"], summary["kept"], summary["bad"]) == (5, 2, 3)
    assert [(e.where.rsplit("/", 1)[-1], e.field) for e in pairs.bad] == [
        ("mixed.jsonl:2", "text"), ("mixed.jsonl:3", None), ("mixed.jsonl:4", "mode")]
    assert summary["reasons"][0].endswith("mixed.jsonl:2: field 'text': empty; give the sentence the TTS should say")
    assert sum("skipping bad preference pair" in r.getMessage() for r in caplog.records) == 3

    with pytest.raises(PreferenceError, match="mixed.jsonl:2: field 'text'"):
        read_preferences(path, on_bad="fail")
    with pytest.raises(ValueError, match="on_bad must be 'skip' or 'fail', got 'ignore'"):
        read_preferences(path, on_bad="ignore")


def test_whole_file_problems_always_raise(wavs, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl does not exist"):
        read_preferences(tmp_path / "nowhere.jsonl")
    (tmp_path / "p.csv").write_text("text,chosen,rejected\n")
    with pytest.raises(PreferenceError, match=r"unknown file type '.csv'; write pairs as .jsonl"):
        read_preferences(tmp_path / "p.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreferenceError, match="not a datasets.save_to_disk folder"):
        read_preferences(tmp_path / "empty")


def test_errors_pickle_and_speech_takes_one_source():
    e = pickle.loads(pickle.dumps(PreferenceError("f.jsonl:3", "text", "empty")))
    assert (str(e), e.field) == ("f.jsonl:3: field 'text': empty", "text")
    with pytest.raises(ValueError, match="exactly one of audio or codec_ids"):
        Speech()
    with pytest.raises(ValueError, match="exactly one of audio or codec_ids"):
        Speech(audio="a.wav", codec_ids=(1,))


class CountingCodec:
    """The real codec, counting encode() calls."""

    def __init__(self, codec):
        self.codec, self.calls = codec, 0
        self.sample_rate, self.codebook_size, self.num_codebooks = codec.sample_rate, codec.codebook_size, codec.num_codebooks

    def encode(self, waveform, sample_rate):
        self.calls += 1
        return self.codec.encode(waveform, sample_rate)


def test_encode_pairs_encodes_each_file_once(wavs, codec):
    audio = wavs / "audio"
    hello, left = str(audio / "hello.wav"), str(audio / "left.wav")
    pairs = [PreferencePair(f"p{i}", "hello", Speech(audio=hello), Speech(codec_ids=(i, 8 + i)), voice=left)
             for i in range(4)]
    counting = CountingCodec(codec)
    encoded = encode_pairs(pairs, counting, on_bad="fail")
    assert counting.calls == 2 and all(isinstance(e, EncodedPair) for e in encoded)
    expected = codec.encode(load_audio(hello, SR), SR)
    assert expected.size > 10 and ((0 <= expected) & (expected < 16)).all()
    for i, e in enumerate(encoded):
        assert e.pair is pairs[i] and e.chosen.dtype == np.int64 and (e.chosen == expected).all()
        assert e.rejected.tolist() == [i, 8 + i] and (e.voice == codec.encode(load_audio(left, SR), SR)).all()
        assert not e.chosen.flags.writeable  # shared by all four pairs
    assert encoded[0].chosen is encoded[3].chosen and encoded.summary()["kept"] == 4
    no_voice = encode_pairs([PreferencePair("v", "hi", Speech(audio=hello), Speech(audio=left))], codec)
    assert no_voice[0].voice is None


def test_corrupt_audio_drops_only_its_pairs(wavs, codec, caplog):
    audio = wavs / "audio"
    broken, hello = str(audio / "broken.wav"), str(audio / "hello.wav")
    pairs = [PreferencePair("ok1", "hi", Speech(audio=hello), Speech(codec_ids=(1, 9))),
             PreferencePair("bad1", "hi", Speech(audio=hello), Speech(audio=broken)),
             PreferencePair("bad2", "hi", Speech(codec_ids=(1, 9)), Speech(audio=hello), voice=broken),
             PreferencePair("ok2", "hi", Speech(codec_ids=(2, 10)), Speech(audio=hello))]
    counting = CountingCodec(codec)
    with caplog.at_level(logging.WARNING):
        encoded = encode_pairs(pairs, counting)
    assert [e.pair.id for e in encoded] == ["ok1", "ok2"] and counting.calls == 1
    assert [(e.where, e.field) for e in encoded.bad] == [("pair 'bad1'", "rejected"), ("pair 'bad2'", "voice")]
    assert encoded.summary()["reasons"][0].startswith(f"pair 'bad1': field 'rejected': {broken}: cannot decode audio")
    assert any("bad2" in r.getMessage() for r in caplog.records)
    with pytest.raises(PreferenceError, match="pair 'bad1': field 'rejected'.*cannot decode audio"):
        encode_pairs(pairs, codec, on_bad="fail")


def test_a_short_judged_clip_is_kept_and_an_empty_one_is_bad(wavs, codec, tmp_path):
    """A policy's sample that stopped after a frame or two is short, and what annotators said of it is
    data; only a clip with nothing in it cannot be encoded."""
    hello = str(wavs / "audio" / "hello.wav")
    short, empty = tmp_path / "short.wav", tmp_path / "empty.wav"
    write_wav(short, load_audio(hello, SR)[: SR // 50], SR)  # 20 ms: one or two codec frames
    write_wav(empty, np.zeros(0, np.float32), SR)
    pairs = [PreferencePair("short", "hi", Speech(audio=hello), Speech(audio=str(short))),
             PreferencePair("empty", "hi", Speech(audio=hello), Speech(audio=str(empty)))]
    encoded = encode_pairs(pairs, codec)
    assert [e.pair.id for e in encoded] == ["short"] and len(encoded[0].rejected) >= codec.num_codebooks
    assert [(e.where, e.field) for e in encoded.bad] == [("pair 'empty'", "rejected")]
    assert str(empty) in encoded.summary()["reasons"][0]


@pytest.mark.parametrize("ids, message", [
    ((0, 16), r"id 16 at position 1 is outside codebook 1's range \[8, 16\)"),  # past codebook_size * num_codebooks
    ((3, 3), r"id 3 at position 1 is outside codebook 1's range"),  # in range, in codebook 0's slot
    ((3, 9, 4), "3 ids is not a whole number of frames of 2 codebooks"),
])
def test_codec_ids_are_checked_against_the_codec(codec, ids, message):
    pairs = [PreferencePair("p", "hi", Speech(codec_ids=(7, 15)), Speech(codec_ids=ids))]
    with pytest.raises(PreferenceError, match=rf"pair 'p': field 'rejected': codec_ids: {message}.*recipe's codec"):
        encode_pairs(pairs, codec, on_bad="fail")
    assert encode_pairs(pairs, codec).summary()["bad"] == 1


def test_docs_example_parses(tmp_path):
    from speechrl.rollouts.codec import unflatten_ids

    guide = DOCS.read_text()
    match = re.search(r"<!-- example: pairs.jsonl -->\n```jsonl\n(.*?)```", guide, re.S)
    assert match, "docs/preferences.md has no ```jsonl block after <!-- example: pairs.jsonl -->"
    for name in ("voices/ann.wav", "audio/p1_a.wav", "audio/p1_b.wav", "audio/p2_a.wav"):
        write_wav(tmp_path / name, 0.3 * np.sin(np.arange(8000) / 10), SR)
    (tmp_path / "pairs.jsonl").write_text(match.group(1))
    p1, p2, p3 = read_preferences(tmp_path / "pairs.jsonl", on_bad="fail")
    assert p1.voice == str(tmp_path / "voices" / "ann.wav") and p1.reason == ("mispronounced", "clipped")
    assert p2.chosen.audio == str(tmp_path / "audio" / "p2_a.wav") and p2.rejected.codec_ids is not None
    assert p3.id == "pairs.jsonl:3" and p3.mode == "tts"
    for side in (p2.rejected, p3.chosen, p3.rejected):  # the ids the guide says are the default codec's
        unflatten_ids(side.codec_ids, 2, 512, "docs example")
