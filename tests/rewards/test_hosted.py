"""hf_classifier: a transformers classifier from a local directory as a reward, text and audio."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from speechrl.rewards.hosted import HfClassifierReward

TEXTS = ["turn left", "go ten meters forward now", "stop", "uh um turn right", "back up three meters"]


def manual_scores(path, texts, index=1, pairs=None):
    """One text at a time, straight through transformers: what the batched reward must reproduce."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path)
    out = []
    for i, text in enumerate(texts):
        features = tokenizer(pairs[i], text, return_tensors="pt") if pairs else tokenizer(text, return_tensors="pt")
        with torch.inference_mode():
            out.append(model(**features).logits.softmax(-1)[0, index].item())
    return out


def test_text_scores_are_the_models_probabilities_in_any_batching(text_classifier):
    expected = manual_scores(text_classifier, TEXTS)
    for batch_size in (1, 2, 16):  # padding inside a batch must not change a sample's score
        reward = HfClassifierReward(str(text_classifier), label="fluent", batch_size=batch_size)
        np.testing.assert_allclose(reward(completions=TEXTS, text=TEXTS), expected, atol=1e-5)
    assert len(set(np.round(expected, 6))) == len(TEXTS)
    by_index = HfClassifierReward(str(text_classifier), label=0)(completions=TEXTS)
    np.testing.assert_allclose(by_index, 1 - np.array(expected), atol=1e-5)


def test_text_pair_column_is_the_first_segment(text_classifier):
    refs = ["turn left", "go", "stop now", "turn right", "back"]
    reward = HfClassifierReward(str(text_classifier), text_pair_column="text", batch_size=2)
    np.testing.assert_allclose(reward(completions=TEXTS, text=refs), manual_scores(text_classifier, TEXTS, pairs=refs),
                               atol=1e-5)


def test_audio_model_scores_speech_and_resamples(audio_classifier, speech):
    import soxr

    reward = HfClassifierReward(str(audio_classifier), modality="audio", batch_size=2)
    clips = list(speech.values())
    batch = [clips[0], clips[1], clips[0], clips[2], clips[0]]  # a prompt's samples share its clip
    scores = reward(completions=list("abcde"), audio=batch, sample_rate=16000)
    alone = {id(c): reward(completions=["x"], audio=[c], sample_rate=16000)[0] for c in clips}
    # this extractor gives no attention mask, so padding would change scores: none may differ
    np.testing.assert_allclose(scores, [alone[id(c)] for c in batch], rtol=1e-5)
    assert len(set(np.round(scores, 4))) == 3  # one logit per clip, and the clips differ
    with_gap = reward(completions=["a", "b"], audio=[clips[0], None], sample_rate=16000)
    assert with_gap == [alone[id(clips[0])], None]  # no audio, no score
    at_22k = [soxr.resample(c, 16000, 22050) for c in clips]  # the same speech at espeak's own rate
    # scored as the clip brought back to the model's 16 kHz (a random model is too sensitive to the
    # round trip's small changes to compare with the original's score)
    back = [reward(completions=["x"], audio=[soxr.resample(c, 22050, 16000)], sample_rate=16000)[0] for c in at_22k]
    np.testing.assert_allclose(reward(completions=["a", "b", "c"], audio=at_22k, sample_rate=22050), back, rtol=1e-5)
    np.testing.assert_allclose(back, [alone[id(c)] for c in clips], rtol=0.1)  # and still about the same


@pytest.mark.parametrize("kwargs, message", [
    ({"label": "great"}, "label 'great' is not a class.*'disfluent'"),
    ({"label": 5}, "label 5 is not a class"),
    ({"modality": "video"}, "modality='video'"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
])
def test_bad_kwargs_name_the_problem(text_classifier, kwargs, message):
    with pytest.raises(ValueError, match=message):
        HfClassifierReward(str(text_classifier), **kwargs)


def test_missing_model_dir_and_columns_are_clear(tmp_path, text_classifier, audio_classifier):
    with pytest.raises(FileNotFoundError, match="no config.json.*save_pretrained"):
        HfClassifierReward(str(tmp_path))
    with pytest.raises(ValueError, match="one output.*drop kwargs.label"):
        HfClassifierReward(str(audio_classifier), modality="audio", label=1)
    with pytest.raises(KeyError, match="no column 'prompt'"):
        HfClassifierReward(str(text_classifier), text_pair_column="prompt")(completions=["a"], text=["b"])
    with pytest.raises(KeyError, match="no 'sample_rate'"):
        HfClassifierReward(str(audio_classifier), modality="audio")(completions=["a"], audio=[np.zeros(1600)])
