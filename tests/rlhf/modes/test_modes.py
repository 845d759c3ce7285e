"""Modes as objects: each mode found by name owns the algorithms it supports and its checks, so
trainers never test a mode's name."""
from __future__ import annotations

import pytest

from speechrl.rlhf.core.checks import registered_modes
from speechrl.rlhf.core.config import RecipeError, load_recipe
from speechrl.rlhf.modes import Mode, get_mode


def test_every_shipped_mode_is_registered_with_what_the_loop_needs():
    modes = registered_modes()
    assert modes.names() == ["asr", "duplex", "realtime", "tts"]
    for name in modes.names():
        cls = modes.get(name)
        assert issubclass(cls, Mode) and cls.name == name
        assert "sft" in cls.algorithms and cls.default_algorithm in cls.algorithms and cls.headlines


@pytest.mark.parametrize("recipe,algorithm", [("asr/sft", "reward_model"), ("asr/grpo", "reward_model")])
def test_a_mode_refuses_an_algorithm_it_does_not_support(recipe, algorithm):
    mode = recipe.split("/")[0]
    with pytest.raises(RecipeError, match=f"not implemented for mode '{mode}'"):
        load_recipe(recipe, [f"algorithm={algorithm}"])


def test_an_unknown_mode_lists_the_registered_ones():
    with pytest.raises(RecipeError, match="choose one of asr, duplex, realtime, tts"):
        load_recipe("asr/sft", ["mode=simplex"])


def test_get_mode_gives_the_recipes_mode_object():
    cfg = load_recipe("tts/grpo")
    mode = get_mode(cfg)
    assert mode.name == "tts" and mode.cfg is cfg and mode.plot_keys()[0] == "eval/tts_intelligibility/cer"


@pytest.mark.parametrize("recipe,overrides,message", [
    ("realtime/ppo", ["train.deepspeed.enabled=true"], "value head"),
    ("tts/reward_model", ["model.lora.enabled=true"], "trains all weights in one process"),
    ("asr/grpo", ["rollout.sampling.n=1"], "needs `rollout.sampling.n` >= 2"),
    ("tts/dpo", ["dpo.beta=0"], "`dpo.beta` must be > 0"),
])
def test_an_algorithms_own_checks_run_at_load(recipe, overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe, overrides)
