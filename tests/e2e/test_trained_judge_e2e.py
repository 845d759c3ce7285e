"""The embedded ASR judge trained enough to hear (~1 min on 2 CPU cores): the build of
rewards/asr_judge.py through SFT, then the judge as the tts_intelligibility reward. Its mechanics, on
judges trained for a couple of steps, are tests/rewards/test_asr_judge.py."""
from __future__ import annotations

import json

import numpy as np

from speechrl.data.synth import synthesize
from speechrl.rewards.asr_judge import SCORES, JudgeBuild
from speechrl.rewards.registry import resolve_reward
from speechrl.rlhf.core.config import SyntheticCorpusConfig
from speechrl.rlhf.trainers.judges import ensure_embedded_judge

SR = 16000


def test_trained_judge_hears_the_right_sentence(tmp_path):
    """A judge trained briefly (60 steps on 300 clips) hears: paired with every sentence, a clip's
    own sentence scores far above the others on average, clean and after the codec round trip
    (the policy's audio), where an untrained judge scores every pair alike (-1).

    Only averages are asserted. The build repeats byte for byte (espeak-ng is reloaded per clip),
    but before it did, four builds of this judge scored held-out CER 0.56-0.77, each hearing some
    sentences and not others: which clip a short-trained judge gets right is an accident of its
    corpus; that it hears is not."""

    from speechrl.rewards.asr_judge import _codec

    build = JudgeBuild(corpus=SyntheticCorpusConfig(num_utterances=300, heldout_fraction=0.1, voices=["en-us"],
                                                    rates=[175], pitches=[50]), steps=60, lr=3e-3)
    path = ensure_embedded_judge(tmp_path, build)
    assert json.loads((path / SCORES).read_text())["clean"]["cer"] < 0.9  # untrained: above 1
    codec = _codec(tmp_path, build)  # the judge's own codec
    texts = ["turn left", "pick up the red ball", "go forward five steps and stop", "put the blue cube on the table",
             "turn right and go back three steps", "stop"]
    clean = [synthesize(t, "en-us", 175, 50, SR) for t in texts]
    audios = clean + [codec.decode(codec.encode(a, SR)) for a in clean]
    reward = resolve_reward("tts_intelligibility", asr=str(path), device="cpu")
    n = len(audios)
    out = reward([""] * n * len(texts), audio=[a for a in audios for _ in texts], text=texts * n, sample_rate=SR)
    scores = np.array(out["reward"]).reshape(n, len(texts))
    mask = np.zeros_like(scores, dtype=bool)
    mask[np.arange(n), np.arange(n) % len(texts)] = True
    # own minus others: after 200 steps, in two builds, clean 0.28 and 0.34, round-tripped 0.29 and 0.16;
    # after 100 steps (held-out CER 0.64), clean 0.36, round-tripped 0.30 (125 s in all); after 60 steps
    # (held-out CER 0.70), clean 0.28, round-tripped 0.28 (66 s)
    margin = lambda rows: scores[rows][mask[rows]].mean() - scores[rows][~mask[rows]].mean()  # noqa: E731
    clean_rows, coded_rows = slice(0, len(texts)), slice(len(texts), n)
    assert margin(clean_rows) > 0.15, scores
    assert margin(coded_rows) > 0.1, scores
