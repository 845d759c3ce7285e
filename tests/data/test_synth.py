"""The espeak-ng corpus builder: grammar, synthesis, and a 12-utterance build."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from speechrl.data import synth
from speechrl.data.audio import load_audio
from speechrl.data.manifest import SpeechDataset, read_manifest

N = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return out, synth.build_corpus(out, num_utterances=N, heldout_fraction=0.25, seed=3)


def test_command_grammar_is_small_short_and_deterministic():
    sentences = synth.command_sentences(500, seed=1)
    assert sentences == synth.command_sentences(500, seed=1)
    assert sentences != synth.command_sentences(500, seed=2)
    assert all(2 <= len(s.split()) <= 6 for s in sentences)
    vocabulary = {w for s in sentences for w in s.split()}
    assert 25 <= len(vocabulary) <= 40
    assert len(set(sentences)) > 100  # enough variety to hold sentences out


def test_composed_commands_are_many_distinct_short_and_deterministic():
    sentences = synth.composed_commands(3000, seed=1)
    assert sentences == synth.composed_commands(3000, seed=1) and len(set(sentences)) == 3000
    assert sentences[:50] != synth.composed_commands(50, seed=2)
    assert all(1 <= len(s.split()) <= synth.COMPOSED_MAX_WORDS for s in sentences)
    grammar = {w for s in synth.command_sentences(2000, seed=0) for w in s.split()}
    assert {w for s in sentences for w in s.split()} - grammar == {"then"}  # the grammar's words, and "then"
    joined = [s for s in sentences if " and " in s or " then " in s]
    assert 0.5 < len(joined) / len(sentences) < 0.95
    assert len(set(sentences) & set(synth.command_sentences(5000, seed=0))) < 400  # mostly not the grammar's
    with pytest.raises(ValueError, match="asked for 20000 distinct sentences, found"):
        synth.composed_commands(20000)


def test_longest_sentences_stay_under_4s_at_slowest_rate():
    longest = ["go forward seven steps and stop", "move the green cube forward",
               "put down the green cube", "turn right seven degrees"]
    for voice in ("en", "en-us", "en-gb-x-rp"):
        for text in longest:
            audio = synth.synthesize(text, voice, rate=140, pitch=35)
            assert 0.8 < len(audio) / 16000 < synth.MAX_SECONDS, (voice, text)


def test_synthesize_speaks_at_requested_rate():
    slow = synth.synthesize("move forward three meters", "en-us", rate=140)
    fast = synth.synthesize("move forward three meters", "en-us", rate=210)
    assert slow.dtype == np.float32 and 0.05 < np.abs(slow).max() <= 1.0
    assert len(fast) < 0.85 * len(slow)
    with pytest.raises(ValueError, match="voice 'xx-nope' not found"):
        synth.synthesize("hello", "xx-nope")


def test_read_text_list(tmp_path):
    (tmp_path / "t.txt").write_text("hello world\n\n   \n  turn left  \n")
    assert synth.read_text_list(tmp_path / "t.txt") == ["hello world", "turn left"]
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no sentences"):
        synth.read_text_list(tmp_path / "e.txt")


def test_corpus_manifests_and_wavs(corpus):
    out, (train_path, heldout_path) = corpus
    train, heldout = read_manifest(train_path), read_manifest(heldout_path)
    assert len(train) + len(heldout) == N and len(heldout) >= 3
    assert not {(e.text, e.extra["voice"]) for e in train} & {(e.text, e.extra["voice"]) for e in heldout}
    assert not {e.id for e in train} & {e.id for e in heldout}
    for e in train + heldout:
        x = e.extra
        assert e.speaker == f"{x['voice']}-r{x['rate']}-p{x['pitch']}"
        assert x["voice"] in ("en", "en-us", "en-gb-x-rp") and x["rate"] in (140, 175, 210)
    data = SpeechDataset(train + heldout, max_seconds=synth.MAX_SECONDS)
    assert data.summary()["bad"] == 0
    assert len(list((out / "audio").glob("*.wav"))) == N


def test_corpus_loads_in_hf_datasets(corpus, tmp_path):
    import datasets

    out, (train_path, _) = corpus
    ds = datasets.load_dataset("json", data_files=str(train_path), split="train",
                               cache_dir=str(tmp_path / "hf_cache"))
    assert ds.num_rows == len(read_manifest(train_path))
    assert load_audio(out / ds[0]["audio"]).size > 0


def test_corpus_is_idempotent_and_deterministic(corpus, tmp_path):
    out, paths = corpus
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    start = time.perf_counter()
    assert synth.build_corpus(out, num_utterances=N, heldout_fraction=0.25, seed=3) == paths
    assert time.perf_counter() - start < 0.5
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps  # nothing rewritten

    # Same parameters elsewhere, after other speech, in another process with one thread: the same
    # bytes in every wav, hence the same fingerprint (espeak-ng's static state is reloaded per clip).
    synth.synthesize("move the red box up", "en-gb-x-rp", 210, 65)
    other = synth.build_corpus(tmp_path / "b", num_utterances=N, heldout_fraction=0.25, seed=3)
    for a, b in zip(paths, other):
        assert a.read_text() == b.read_text()
    for wav in (out / "audio").iterdir():
        assert wav.read_bytes() == (tmp_path / "b" / "audio" / wav.name).read_bytes()
    code = ("import sys; from speechrl.data import synth; "
            "synth.build_corpus(sys.argv[1], num_utterances=12, heldout_fraction=0.25, seed=3)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "d")], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    prints = {json.loads((d / "corpus.json").read_text())["fingerprint"] for d in (out, tmp_path / "b", tmp_path / "d")}
    assert len(prints) == 1 and len(prints.pop()) == 12
    reseeded = synth.build_corpus(tmp_path / "c", num_utterances=N, heldout_fraction=0.25, seed=4)
    assert reseeded[0].read_text() != paths[0].read_text()


def test_corpus_resumes_and_rebuilds_on_new_params(tmp_path):
    out = tmp_path / "c"
    synth.build_corpus(out, num_utterances=6, heldout_fraction=0.2, seed=0)
    whole = json.loads((out / "corpus.json").read_text())["fingerprint"]
    wavs = sorted((out / "audio").iterdir())
    lost = tmp_path / "lost.wav"
    lost.write_bytes(wavs[2].read_bytes())
    wavs[2].unlink()
    (out / "corpus.json").unlink()  # as if the build was interrupted
    before = {p: p.stat().st_mtime_ns for p in wavs if p.exists()}
    synth.build_corpus(out, num_utterances=6, heldout_fraction=0.2, seed=0)
    assert wavs[2].read_bytes() == lost.read_bytes()  # resynthesized out of order, the same bytes
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the others were kept
    assert json.loads((out / "corpus.json").read_text())["fingerprint"] == whole

    texts = ["open the door", "close the window"]
    train, heldout = synth.build_corpus(out, num_utterances=4, heldout_fraction=0.0, texts=texts)
    assert json.loads((out / "corpus.json").read_text())["num_utterances"] == 4
    assert sorted(e.text for e in read_manifest(train)) == sorted(texts * 2)
    assert read_manifest(heldout) == []
    assert len(list((out / "audio").iterdir())) == 4  # the old build's wavs were removed


def test_split_keeps_each_text_voice_pair_on_one_side(tmp_path):
    texts = ["go left", "turn right"]
    train, heldout = synth.build_corpus(tmp_path, num_utterances=8, heldout_fraction=0.25,
                                        voices=("en",), texts=texts)
    train_texts = {e.text for e in read_manifest(train)}
    heldout_texts = {e.text for e in read_manifest(heldout)}
    # Each text was spoken 4 times by the one voice: all 4 go to the same side.
    assert len(heldout_texts) == 1 and not train_texts & heldout_texts
    assert len(read_manifest(heldout)) == 4


def test_the_piper_voice_speaks_corpus_clips_at_the_drawn_rate(tmp_path):
    texts = ["the weather is lovely today", "a small dog sleeps by the fire"]
    train, _ = synth.build_corpus(tmp_path, num_utterances=4, heldout_fraction=0.0, voices=("piper",),
                                  rates=(150, 210), texts=texts, seed=0)
    rows = read_manifest(train)
    assert {r.extra["voice"] for r in rows} == {"piper"} and all(r.speaker.startswith("piper-r") for r in rows)
    ds = SpeechDataset(rows, 16000, on_bad="fail")
    seconds = {(ex.text, ex.extra["rate"]): len(a) / 16000 for ex, a in ds}
    assert all(0.8 < s < 4.0 for s in seconds.values())
    for text in texts:  # a faster rate is a shorter clip (length_scale = 175 / rate)
        if (text, 150) in seconds and (text, 210) in seconds:
            assert seconds[(text, 210)] < seconds[(text, 150)]


def test_threads_speaking_first_at_once_share_one_engine_and_hear_what_one_thread_hears():
    """The first calls in a process, from several threads at once, make one espeak-ng engine (two
    initialising the C library together abort the process) and say what a lone call says."""
    code = ("import sys, numpy as np; from concurrent.futures import ThreadPoolExecutor; "
            "from speechrl.data import synth; "
            "texts = ['turn left', 'pick up the red ball', 'stop', 'go forward five steps']; "
            "together = list(ThreadPoolExecutor(4).map(synth.synthesize, texts)); "
            "assert all(np.array_equal(a, synth.synthesize(t)) for a, t in zip(together, texts)); "
            "print('same', len(texts))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "same 4", done.stderr[-2000:]
