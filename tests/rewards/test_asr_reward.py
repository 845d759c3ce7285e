import math

import pytest

from speechrl.rewards.asr import AsrWerReward, char_error_rate, has_word_loop, word_error_rate


def test_wer_hand_worked():
    assert word_error_rate("go 10 meters", "go ten meters") == 0.0
    assert word_error_rate("turn left", "turn right") == 0.5  # 1 substitution / 2 words
    assert word_error_rate("Turn LEFT!", "turn left") == 0.0
    assert word_error_rate("a b c d", "a b") == 1.0  # 2 insertions / 2 words


def test_cer_hand_worked():
    assert char_error_rate("turn left", "turn lift") == pytest.approx(1 / 9)
    # CJK: 1 of 2 characters wrong, not 1 of 3 "characters" counting an inserted space
    assert char_error_rate("你们", "你好") == 0.5
    assert word_error_rate("你们", "你好") == 0.5


def test_empty_reference():
    assert word_error_rate("", "") == 0.0
    assert word_error_rate("...", "") == 0.0  # nothing left after normalization
    assert word_error_rate("hello", "") == 1.0
    assert char_error_rate("hello", "") == 1.0


def test_word_loops():
    assert has_word_loop("go go go".split())
    assert has_word_loop("turn left turn left turn left now".split())
    assert has_word_loop("a b c d a b c d a b c d".split())
    assert not has_word_loop("go go left".split())
    assert not has_word_loop("a b c d e a b c d e a b c d e".split())  # 5-grams are out of range


def _score(reward, completions, text, completion_ids=None):
    return reward(completions=completions, text=text, completion_ids=completion_ids, mode="asr", id=list(range(len(text))))


def test_clean_output_has_no_penalty():
    out = _score(AsrWerReward(), ["turn right", "go 10 meters"], ["turn left", "go ten meters"])
    assert out["reward"] == [-0.5, 0.0]
    assert out["wer"] == [0.5, 0.0]
    assert out["empty"] == out["repetition"] == out["runaway"] == [0.0, 0.0]
    assert set(out) == {"reward", "wer", "cer", "empty", "repetition", "runaway"}


def test_penalties_fire():
    reward = AsrWerReward()
    out = _score(
        reward,
        ["", "go go go go", "turn left and then go ten meters and stop now"],
        ["turn left", "go", "turn left"],
    )
    assert out["empty"] == [1.0, 0.0, 0.0]
    assert out["repetition"] == [0.0, 1.0, 0.0]
    assert out["runaway"] == [0.0, 0.0, 1.0]  # 10 words > 2.0 * 2 + 2
    # empty: -1 (wer) - 1 (empty); loop: WER 3 capped at 1, -0.5 loop, 4 > 2*1+2 is not runaway
    assert out["reward"] == [-2.0, -1.5, -1.5]


def test_repetition_in_reference_is_not_penalized():
    out = _score(AsrWerReward(), ["no no no"], ["No, no, no!"])
    assert out["repetition"] == [0.0] and out["reward"] == [0.0]


def test_token_run_is_a_loop():
    out = _score(AsrWerReward(loop_token_run=5), ["turn left", "turn left"], ["turn left"] * 2,
                 completion_ids=[[7, 7, 7, 7, 7], [7, 7, 7, 7, 8]])
    assert out["repetition"] == [1.0, 0.0]
    assert out["reward"] == [-0.5, 0.0]


def test_cer_metric_and_cap():
    out = _score(AsrWerReward(metric="cer", wer_cap=0.2), ["turn lift", "xyz"], ["turn left", "ab"])
    assert out["reward"] == [pytest.approx(-1 / 9), -0.2]


def test_missing_reference_scores_nan():
    out = _score(AsrWerReward(), ["hi"], [None])
    assert math.isnan(out["reward"][0])


def test_reference_column_is_configurable():
    out = AsrWerReward(reference_column="transcript")(completions=["hi"], transcript=["hi"])
    assert out["reward"] == [0.0]
    with pytest.raises(KeyError, match="'transcript'.*reference_column"):
        AsrWerReward(reference_column="transcript")(completions=["hi"], text=["hi"])


def test_bad_metric_is_rejected():
    with pytest.raises(ValueError, match="metric='bleu'"):
        AsrWerReward(metric="bleu")
