"""load_audio / write_wav on real recordings (shared data) and on clips made here."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import soundfile as sf

from speechrl.data.audio import BadExample, load_audio, write_wav


def _tone(seconds=1.0, rate=16000, freq=440.0, amp=0.5):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("name, reason", [
    ("bad.wav", "cannot decode"), ("evil.wav", "cannot decode"), ("awful.wav", "1092676 Hz"),
])
def test_malformed_files_are_bad_examples_naming_path_and_reason(shared_data, name, reason):
    path = shared_data / "real_speech" / "malformed" / name
    with pytest.raises(BadExample) as info:
        load_audio(path)
    assert info.value.source == str(path)
    assert reason in info.value.reason
    assert str(info.value) == f"{path}: {info.value.reason}"


def test_librivox_loads_at_16k_unchanged_length(shared_data):
    wavs = sorted((shared_data / "real_speech" / "librivox").glob("*.wav"))
    assert len(wavs) == 5
    for wav in wavs:
        audio = load_audio(wav)
        assert audio.dtype == np.float32 and audio.ndim == 1
        assert len(audio) == sf.info(wav).frames  # already 16 kHz: no resampling
        assert 0.01 < np.abs(audio).max() <= 1.0


def test_jfk_stereo_44k_becomes_mono_16k_11s(shared_data):
    path = shared_data / "real_speech" / "misc" / "jfk.flac"
    audio = load_audio(path, 16000, max_seconds=None)
    assert audio.ndim == 1 and audio.dtype == np.float32
    assert abs(len(audio) / 16000 - 11.0) < 0.01
    with pytest.raises(BadExample, match="too long: 11.00 s > max_seconds=5"):
        load_audio(path, max_seconds=5)


def test_bytes_decode_like_paths_and_use_name(shared_data, tmp_path):
    wav = shared_data / "real_speech" / "librivox" / "austen-0880.wav"
    np.testing.assert_array_equal(load_audio(wav.read_bytes()), load_audio(wav))
    bad = (shared_data / "real_speech" / "malformed" / "bad.wav").read_bytes()
    with pytest.raises(BadExample) as info:
        load_audio(bad, name="row 7")
    assert info.value.source == "row 7"


def test_resampling_keeps_duration_and_pitch(tmp_path):
    write_wav(tmp_path / "a.wav", _tone(1.0, rate=8000, freq=440.0), 8000)
    audio = load_audio(tmp_path / "a.wav", 16000)
    assert len(audio) == 16000
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / len(audio) - 440.0) < 2.0


def test_stereo_is_downmixed_by_mean(tmp_path):
    stereo = np.stack([np.full(8000, 0.5), np.full(8000, -0.1)], axis=1)
    sf.write(tmp_path / "s.wav", stereo, 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "s.wav"), 0.2, atol=1e-6)


@pytest.mark.parametrize("make, reason", [
    (lambda p: sf.write(p, np.zeros(16000), 16000), "silent"),
    (lambda p: sf.write(p, np.full(16000, np.nan), 16000, subtype="FLOAT"), "non-finite"),
    (lambda p: sf.write(p, _tone(0.1), 16000), "too short"),
    (lambda p: sf.write(p, np.tile(_tone(0.5)[:, None], (1, 9)), 16000), "9 channels"),
    (lambda p: sf.write(p, _tone(0.5, rate=2000), 2000), "2000 Hz outside"),
    (lambda p: None, "file not found"),
])
def test_unusable_clips_are_rejected_with_reason(tmp_path, make, reason):
    path = tmp_path / "clip.wav"
    make(path)
    with pytest.raises(BadExample, match=reason) as info:
        load_audio(path)
    assert info.value.source == str(path)


def test_write_wav_is_16bit_and_round_trips(tmp_path):
    audio = _tone(0.5)
    path = write_wav(tmp_path / "sub" / "x.wav", audio, 16000)
    assert sf.info(path).subtype == "PCM_16"
    np.testing.assert_allclose(load_audio(path), audio, atol=1 / 32768)
    assert [p.name for p in path.parent.iterdir()] == ["x.wav"]  # no temp file left behind


def test_bad_example_pickles():
    e = pickle.loads(pickle.dumps(BadExample("/a.wav", "silent")))
    assert (e.source, e.reason, str(e)) == ("/a.wav", "silent", "/a.wav: silent")
