"""Speech rewards on real recordings (../shared/data/real_speech) with their real judges:
pocketsphinx, resemblyzer and DNSMOS, all offline from their wheels."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from speechrl.data.audio import load_audio
from speechrl.rewards.api import Unscored
from speechrl.rewards.registry import resolve_reward

SR = 16000


@pytest.fixture(scope="module")
def librivox(shared_data):
    folder = shared_data / "real_speech" / "librivox"
    wavs = sorted(folder.glob("*.wav"))
    return [load_audio(w, SR) for w in wavs], [w.with_suffix(".txt").read_text().strip() for w in wavs]


@pytest.fixture(scope="module")
def two_speakers(shared_data):
    folder = shared_data / "real_speech" / "speechbrain_asr"
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return [(row["speaker"], load_audio(folder / row["audio"], SR), row["text"]) for row in rows]


def test_intelligibility_ranks_each_clips_transcript_first(librivox):
    """Every clip paired with every transcript: its own must score best (pocketsphinx judge)."""
    audios, texts = librivox
    n = len(audios)
    reward = resolve_reward("tts_intelligibility")
    out = reward([""] * n * n, audio=[a for a in audios for _ in texts], text=texts * n, sample_rate=SR)
    scores = np.array(out["reward"]).reshape(n, n)
    assert (scores.argmax(axis=1) == np.arange(n)).all(), scores
    assert np.diag(scores).min() > -0.35  # pocketsphinx's CER on these read clips is low
    assert reward._judge is not None and set(out) == {"reward", "cer", "wer"}


def test_intelligibility_resamples_and_leaves_missing_unscored(librivox):
    audios, texts = librivox
    import soxr

    reward = resolve_reward("tts_intelligibility", metric="wer")
    at_16k = reward([""], audio=[audios[4]], text=[texts[4]], sample_rate=SR)["reward"][0]
    at_8k = reward([""], audio=[soxr.resample(audios[4], SR, 8000)], text=[texts[4]], sample_rate=8000)["reward"][0]
    assert at_16k > -0.5 and at_8k > -0.7
    out = reward(["", ""], audio=[None, np.zeros(0, np.float32)], text=["a", "b"], sample_rate=SR)
    assert math.isnan(out["reward"][0]) and isinstance(out["reward"][1], Unscored)
    with pytest.raises(KeyError, match="no column 'audio'"):
        reward([""], text=["x"], sample_rate=SR)
    with pytest.raises(ValueError, match="sample_rate"):
        reward([""], audio=[audios[0]], text=["x"], sample_rate=None)
    with pytest.raises(FileNotFoundError, match="neither 'pocketsphinx'"):
        resolve_reward("tts_intelligibility", asr="/no/such/model")


def test_speaker_similarity_same_speaker_above_cross_speaker(two_speakers):
    """resemblyzer: every same-speaker pair (different sentences) beats every cross-speaker pair."""
    reward = resolve_reward("speaker_similarity")
    pairs = [(i, j) for i in range(len(two_speakers)) for j in range(i + 1, len(two_speakers))]
    scores = reward([""] * len(pairs), audio=[two_speakers[i][1] for i, _ in pairs],
                    reference_audio=[two_speakers[j][1] for _, j in pairs], sample_rate=SR)
    same = [s for (i, j), s in zip(pairs, scores) if two_speakers[i][0] == two_speakers[j][0]]
    cross = [s for (i, j), s in zip(pairs, scores) if two_speakers[i][0] != two_speakers[j][0]]
    assert len(same) == 20 and len(cross) == 25
    assert min(same) > max(cross), (sorted(same)[:3], sorted(cross)[-3:])


def test_dnsmos_scores_clean_speech_above_noisy(librivox):
    audios, _ = librivox
    rng = np.random.default_rng(0)
    noisy = []
    for a in audios[:3]:  # 0 dB SNR white noise
        noise = rng.standard_normal(len(a)).astype(np.float32)
        noisy.append(np.clip(a + noise * np.sqrt(np.mean(a ** 2)), -1, 1))
    out = resolve_reward("dnsmos")([""] * 6, audio=audios[:3] + noisy, sample_rate=SR)
    clean, dirty = out["reward"][:3], out["reward"][3:]
    assert all(1 <= s <= 5 for s in out["reward"]) and set(out) == {"reward", "sig", "bak", "p808"}
    assert min(clean) > max(dirty) + 0.5, (clean, dirty)
    assert min(out["bak"][:3]) > max(out["bak"][3:])


def test_speech_sanity_passes_real_speech_and_flags_failures(librivox, two_speakers):
    reward = resolve_reward("speech_sanity")
    audios = librivox[0] + [a for _, a, _ in two_speakers]
    texts = librivox[1] + [t for _, _, t in two_speakers]
    out = reward([""] * len(audios), audio=audios, text=texts, sample_rate=SR)
    assert out["reward"] == [0.0] * len(audios), out
    speech, text = librivox[0][0], librivox[1][0]
    broken = [speech[:SR // 2],  # half a second for a long sentence
              np.concatenate([speech, np.zeros(4 * len(speech), np.float32)]),  # mostly silence (and too slow)
              np.clip(speech * 20, -1, 1),  # clipped
              np.zeros(len(speech), np.float32)]  # nothing at all
    out = reward([""] * 4, audio=broken, text=[text] * 4, sample_rate=SR)
    assert out["bad_rate"] == [1.0, 1.0, 0.0, 0.0]
    assert out["silent"] == [0.0, 1.0, 0.0, 1.0]
    assert out["clipped"] == [0.0, 0.0, 1.0, 0.0]
    assert out["reward"] == [-1.0, -2.0, -1.0, -1.0]


def test_speech_rewards_are_registered_by_name():
    from speechrl.rewards.registry import REWARDS

    assert {"tts_intelligibility", "speaker_similarity", "dnsmos", "speech_sanity"} <= set(REWARDS.names())
    with pytest.raises(ValueError, match="chars_per_second"):
        resolve_reward("speech_sanity", chars_per_second=(10, 5))


def _tiny_wav2vec2_config(**kw):
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_feat_extract_layers=2,
                          num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, **kw)


def test_transformers_asr_judge_from_a_local_directory(tmp_path, librivox):
    """A tiny random wav2vec2-CTC saved with its processor: it loads, transcribes, and scores."""
    import torch
    from transformers import (Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC,
                              Wav2Vec2Processor)

    torch.manual_seed(0)
    vocab = {"<pad>": 0, "|": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")}}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), word_delimiter_token="|")
    Wav2Vec2Processor(Wav2Vec2FeatureExtractor(sampling_rate=SR), tokenizer).save_pretrained(tmp_path)
    Wav2Vec2ForCTC(_tiny_wav2vec2_config(vocab_size=len(vocab), pad_token_id=0)).save_pretrained(tmp_path)

    audios, texts = librivox
    out = resolve_reward("tts_intelligibility", asr=str(tmp_path))([""] * 2, audio=audios[:2], text=texts[:2],
                                                                   sample_rate=SR)
    assert all(-1.0 <= r <= 0.0 for r in out["reward"])  # random weights: a bounded score, nothing more
    assert out["reward"] == [-min(c, 1.0) for c in out["cer"]]


def test_transformers_speaker_encoder_from_a_local_directory(tmp_path, two_speakers):
    import torch
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForXVector

    torch.manual_seed(0)
    Wav2Vec2ForXVector(_tiny_wav2vec2_config(tdnn_dim=(16, 16), tdnn_kernel=(3, 1), tdnn_dilation=(1, 1),
                                             xvector_output_dim=8)).save_pretrained(tmp_path)
    Wav2Vec2FeatureExtractor(sampling_rate=SR).save_pretrained(tmp_path)
    a, b = two_speakers[0][1], two_speakers[5][1]
    scores = resolve_reward("speaker_similarity", model=str(tmp_path))([""] * 2, audio=[a, a], reference_audio=[a, b],
                                                                        sample_rate=SR)
    assert scores[0] == pytest.approx(1.0, abs=1e-4) and -1.0 <= scores[1] <= 1.0
    with pytest.raises(FileNotFoundError, match="neither 'resemblyzer'"):
        resolve_reward("speaker_similarity", model=str(tmp_path / "missing"))
