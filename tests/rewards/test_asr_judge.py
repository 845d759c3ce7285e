"""The backbone ASR judge and the embedded judge's build, on real parts: espeak-ng speech, the
embedded codec, the tiny backbone and SFT. The judges built here train for a couple of steps (a
mechanics check); tests/e2e/test_trained_judge_e2e.py trains one that can hear."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from speechrl.data.synth import synthesize
from speechrl.rewards.api import Unscored
from speechrl.rewards.asr_judge import SCORES, BackboneAsrJudge, JudgeBuild, is_backbone_dir, judge_dir
from speechrl.rewards.registry import resolve_reward
from speechrl.rlhf.core.config import SyntheticCorpusConfig
from speechrl.rlhf.core.fingerprint import fingerprint
from speechrl.rlhf.trainers.judges import ensure_embedded_judge

SR = 16000
TINY_CORPUS = SyntheticCorpusConfig(num_utterances=40, heldout_fraction=0.1, voices=["en-us"], rates=[175],
                                    pitches=[50])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tiny_judge(cache):
    """A judge built by two callers at once (2 SFT steps on a 40-clip corpus): both get the same one."""
    build = JudgeBuild(corpus=TINY_CORPUS, steps=2, batch_size=4)
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: ensure_embedded_judge(cache, build), range(2)))
    assert paths[0] == paths[1]
    return paths[0], build


@pytest.fixture(scope="module")
def sentences():
    texts = ["turn left", "pick up the red ball", "go forward five steps and stop"]
    return texts, [synthesize(t, "en-us", 175, 50, SR) for t in texts]


def test_embedded_judge_is_built_once_into_the_cache_and_reused(cache, tiny_judge):
    path, build = tiny_judge
    assert path == judge_dir(cache, build) and is_backbone_dir(path)
    assert [p.name for p in (cache / "judges").iterdir() if p.is_dir()] == [path.name]  # one build, no .partial left
    scores = json.loads((path / SCORES).read_text())
    for split in ("clean", "round_trip"):
        assert scores[split]["clips"] == 4 and scores[split]["cer"] >= 0 and scores[split]["wer"] >= 0
    assert scores["build"]["steps"] == 2 and scores["build_seconds"] > 0
    # its own corpus (not the ASR recipes' synthetic-*), and the round trips beside it under their own ids
    corpus = next((cache / "corpora").iterdir())
    assert corpus.name.startswith("tts-") and json.loads((corpus / "corpus.json").read_text())["voices"] == ["en-us"]
    coded = [json.loads(line) for line in next(corpus.glob("codec-*/heldout.jsonl")).read_text().splitlines()]
    assert len(coded) == 4 and all(row["id"].endswith("-codec") for row in coded)

    start, mtime = time.perf_counter(), (path / SCORES).stat().st_mtime
    assert ensure_embedded_judge(cache, build) == path
    assert time.perf_counter() - start < 30 and (path / SCORES).stat().st_mtime == mtime
    assert judge_dir(cache, JudgeBuild(corpus=TINY_CORPUS, steps=3, batch_size=4)) != path


def test_a_judge_rebuilt_in_a_one_thread_process_has_the_same_weights(cache, tiny_judge, tmp_path):
    """A Ray reward worker starts with OMP_NUM_THREADS=1; the driver has every core. Both build the
    same judge (the build sets its own thread count). Built here in two fresh processes: this test
    process's thread count is not the build's to vouch for (an in-process vLLM engine pins it)."""
    path, build = tiny_judge
    recorded = json.loads((path / SCORES).read_text())["fingerprint"]
    assert recorded == fingerprint(path / "model.safetensors")
    code = ("import sys; from speechrl.rewards.asr_judge import JudgeBuild; "
            "from speechrl.rlhf.core.config import SyntheticCorpusConfig as C; "
            "from speechrl.rlhf.trainers.judges import ensure_embedded_judge; "
            "corpus = C(num_utterances=40, heldout_fraction=0.1, voices=['en-us'], rates=[175], pitches=[50]); "
            "ensure_embedded_judge(sys.argv[1], JudgeBuild(corpus=corpus, steps=2, batch_size=4))")
    prints = []
    for n, threads in enumerate([{}, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}]):
        shutil.move(path, tmp_path / f"build-{n}")  # the corpus and codec stay: only the judge is rebuilt
        subprocess.run([sys.executable, "-c", code, str(cache)], check=True, env={**os.environ, **threads})
        prints.append(json.loads((path / SCORES).read_text())["fingerprint"])
        assert prints[-1] == fingerprint(path / "model.safetensors")
    assert prints[0] == prints[1]


def test_backbone_judge_cuts_clips_to_its_audio_window(tiny_judge, sentences):
    judge = BackboneAsrJudge(tiny_judge[0], device="cpu", batch_size=2)
    speech = np.concatenate(sentences[1] * 20)  # a rambling TTS sample, far past the 4 s window
    assert len(speech) > 2 * judge.window
    long, cut, short = judge.transcribe_batch([speech, speech[: judge.window], sentences[1][0]])
    assert long == cut and isinstance(short, str)
    assert judge.transcribe(sentences[1][0]) == short  # batched or alone, the same greedy transcript


def test_tts_intelligibility_with_a_backbone_directory(tiny_judge, sentences):
    texts, audios = sentences
    reward = resolve_reward("tts_intelligibility", asr=str(tiny_judge[0]), device="cpu")
    batch = [audios[0], audios[0], audios[1], None, np.zeros(0, np.float32)]  # one clip sent for two texts
    out = reward([""] * 5, audio=batch, text=[texts[0], texts[1], texts[1], "x", "y"], sample_rate=SR)
    assert isinstance(reward.judge, BackboneAsrJudge) and set(out) == {"reward", "cer", "wer"}
    assert math.isnan(out["reward"][3]) and isinstance(out["reward"][4], Unscored)
    for i in range(3):
        assert -1.0 <= out["reward"][i] <= 0.0 and out["cer"][i] >= 0 and out["wer"][i] >= 0
        assert out["reward"][i] == -min(out["cer"][i], 1.0)


def test_asr_embedded_finds_the_judge_in_the_reward_cache_dir(tmp_path, tiny_judge, cache):
    """asr="embedded" loads the default build's judge from cache_dir; one placed there is not rebuilt."""
    import shutil

    # the default build's key hashes the default codec's output; the tiny judge used the same codec
    shutil.copytree(cache / "codecs", tmp_path / "codecs")
    shutil.copytree(tiny_judge[0], judge_dir(tmp_path, JudgeBuild()))
    reward = resolve_reward("tts_intelligibility", asr="embedded", cache_dir=str(tmp_path), device="cpu")
    out = reward([""], audio=[synthesize("stop", "en-us", 175, 50, SR)], text=["stop"], sample_rate=SR)
    assert isinstance(reward.judge, BackboneAsrJudge) and reward.judge.path == judge_dir(tmp_path, JudgeBuild())
    assert -1.0 <= out["reward"][0] <= 0.0


def test_judge_directories_are_told_apart(tmp_path, tiny_judge):
    assert is_backbone_dir(tiny_judge[0])
    (tmp_path / "whisper").mkdir()
    (tmp_path / "whisper" / "config.json").write_text(json.dumps({"architectures": ["WhisperForConditionalGeneration"]}))
    assert not is_backbone_dir(tmp_path / "whisper")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken/config.json"):
        is_backbone_dir(tmp_path / "broken")
    with pytest.raises(FileNotFoundError, match="'embedded'"):
        resolve_reward("tts_intelligibility", asr=str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="asr=3"):
        resolve_reward("tts_intelligibility", asr=3)


def test_the_judge_learns_the_recipes_own_corpus(tmp_path, tiny_judge, cache):
    """`corpus=` (the TTS recipes pass ${data.synthetic}) picks the judge trained on that corpus: its
    sentences, not the command grammar's; the TTS demo's corpus keeps the default judge's key."""
    from dataclasses import asdict

    from speechrl.rewards.asr_judge import judge_build
    from speechrl.rlhf.core.config import load_recipe
    from speechrl.rlhf.trainers.judges import judge_builds, judge_corpus

    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat on the mat\nopen the window please\nwe sail at dawn\n")
    own = SyntheticCorpusConfig(num_utterances=6, heldout_fraction=0.34, voices=["en-us"], rates=[175], pitches=[50],
                                texts=str(texts))
    (train, heldout), (coded_train, _) = judge_corpus(cache, JudgeBuild(corpus=own))
    read = lambda p: {json.loads(line)["text"] for line in p.read_text().splitlines()}  # noqa: E731
    assert read(train) | read(heldout) == set(texts.read_text().splitlines()) and read(coded_train) == read(train)

    default = load_recipe("tts/grpo", [f"run.cache_dir={cache}"])
    assert judge_build(default.rewards[0].kwargs["corpus"]) == JudgeBuild()
    mine = load_recipe("tts/grpo", [f"run.cache_dir={cache}", f"data.synthetic.texts={texts}"])
    [build] = judge_builds(mine)
    assert build.args[1] == JudgeBuild(corpus=mine.data.synthetic) and build.args[1].corpus.texts == str(texts)

    # the reward reads the judge of its corpus (given as a plain mapping, as YAML would)
    shutil.copytree(cache / "codecs", tmp_path / "cache" / "codecs")
    shutil.copytree(tiny_judge[0], judge_dir(tmp_path / "cache", JudgeBuild(corpus=own)))
    reward = resolve_reward("tts_intelligibility", asr="embedded", cache_dir=str(tmp_path / "cache"), device="cpu",
                            corpus=asdict(own))
    reward([""], audio=[synthesize("we sail at dawn", "en-us", 175, 50, SR)], text=["we sail at dawn"], sample_rate=SR)
    assert reward.judge.path == judge_dir(tmp_path / "cache", JudgeBuild(corpus=own)) != judge_dir(tmp_path / "cache")
    with pytest.raises(ValueError, match="unknown field.*voice;.*voices"):
        resolve_reward("tts_intelligibility", asr="embedded", corpus={"voice": ["en-us"]})
    with pytest.raises(TypeError, match="corpus='en-us'"):
        resolve_reward("tts_intelligibility", asr="embedded", corpus="en-us")
