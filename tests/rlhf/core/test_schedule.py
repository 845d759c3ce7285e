"""Schedule recipes (recipes/multi): loading, the checks that name the stage and key, the runs a
schedule expands into, and the mixture's draws."""
from __future__ import annotations

import textwrap

import numpy as np
import pytest

from speechrl.rlhf.core.config import RECIPES_DIR, RecipeError, load_recipe
from speechrl.rlhf.core.schedule import is_schedule, load_schedule, stage_recipes
from speechrl.rlhf.trainers.schedule import matrix_table, units
from speechrl.rlhf.trainers.sft_mix import mixture_draws

SCHEDULES = sorted(str(p.relative_to(RECIPES_DIR))[:-5] for p in RECIPES_DIR.rglob("*.yaml")
                   if "schedule:" in p.read_text())


def write(tmp_path, text: str) -> str:
    path = tmp_path / "schedule.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


STAGES = """
schedule:
  shared: [model.tiny.texts=all_modes]
  stages:
    - {name: mix, mix: {asr/sft: 3, tts/sft: 1}, steps: 8}
    - {name: rl, mix: {asr/grpo: 2, tts/grpo: 1}, rounds: 2, steps: 12}
    - {name: tts_rl, recipe: tts/grpo}
"""


@pytest.mark.parametrize("name", SCHEDULES)
def test_shipped_schedules_load_and_every_stage_shares_one_backbone_setting(name):
    schedule = load_schedule(name)
    assert is_schedule(name) and schedule.evaluate
    for stage in schedule.stages:
        for recipe in stage_recipes(stage):
            cfg = load_recipe(recipe, [*schedule.shared, *stage.overrides])
            assert cfg.model.tiny.texts == "all_modes"
            assert cfg.tts.embedded_codec.hop_length == 320, "one codec for every stage that speaks"


def test_a_schedule_is_not_a_recipe():
    with pytest.raises(RecipeError, match="is a schedule of stages.*speechrl train multi/demo"):
        load_recipe("multi/demo")


def test_stages_expand_into_runs(tmp_path):
    schedule = load_schedule(write(tmp_path, STAGES))
    plan = units(schedule)
    # an SFT mix is one run; an RL mix takes turns: 2 rounds x (asr 2/3, tts 1/3 of 12 steps / 2 rounds)
    assert [(u.name, list(u.recipes), u.steps, u.last_of_stage) for u in plan] == [
        ("01-mix", ["asr/sft", "tts/sft"], 8, True),
        ("02-rl-r1-asr", ["asr/grpo"], 4, False), ("02-rl-r1-tts", ["tts/grpo"], 2, False),
        ("02-rl-r2-asr", ["asr/grpo"], 4, False), ("02-rl-r2-tts", ["tts/grpo"], 2, True),
        ("03-tts_rl", ["tts/grpo"], 0, True)]
    assert plan[0].recipes == {"asr/sft": 0.75, "tts/sft": 0.25}


def test_command_line_overrides_reach_the_schedule_or_every_stage(tmp_path):
    schedule = load_schedule(write(tmp_path, STAGES), ["schedule.stages.2.steps=5", "train.lr=1e-4"])
    assert schedule.stages[2].steps == 5
    assert schedule.shared == ["model.tiny.texts=all_modes", "train.lr=1e-4"]


@pytest.mark.parametrize("stage, message", [
    ("{name: a, steps: 3}", r"stages.0`.*exactly one of `recipe`"),
    ("{name: a, recipe: asr/sft, mix: {tts/sft: 1}}", r"stages.0`.*exactly one of"),
    ("{name: a, mix: {asr/sft: 0, tts/sft: 1}}", r"stages.0.mix` shares must be > 0"),
    ("{name: a, mix: {asr/sft: 1, tts/grpo: 1}}", r"stages.0.mix` mixes grpo, sft"),
    ("{name: a, mix: {asr/sft: 1, tts/sft: 1}, rounds: 2}", r"rounds 1"),
    ("{name: a, mix: {asr/grpo: 1, tts/grpo: 1}, rounds: 3, steps: 4}", r"stages.0.steps`=4 leaves a turn"),
    ("{name: 'a b', recipe: asr/sft}", r"stages.0.name` is 'a b'"),
    ("{name: a, recipe: asr/sft, steps: -1}", r"`steps` must be >= 0"),
    ("{name: a, recipe: asr/nope}", r"stages.0` \(asr/nope\): recipe 'asr/nope' not found"),
    ("{name: a, recipe: asr/sft, overrides: [train.lr=-1]}", r"stages.0` \(asr/sft\):.*train.lr"),
])
def test_bad_stages_name_the_stage_and_key(tmp_path, stage, message):
    with pytest.raises(RecipeError, match=message):
        load_schedule(write(tmp_path, f"schedule:\n  stages:\n    - {stage}\n"))


def test_other_bad_schedules(tmp_path):
    with pytest.raises(RecipeError, match="one `schedule:` mapping"):
        load_schedule(write(tmp_path, "schedule: {stages: []}\nmode: asr\n"))
    with pytest.raises(RecipeError, match="`schedule.stages` is empty"):
        load_schedule(write(tmp_path, "schedule: {stages: []}\n"))
    with pytest.raises(RecipeError, match="its own name"):
        load_schedule(write(tmp_path, "schedule:\n  stages: [{name: a, recipe: asr/sft}, {name: a, recipe: asr/sft}]\n"))
    with pytest.raises(RecipeError, match=r"schedule.evaluate.0` \(asr/sft\):.*data.max_eval_examples"):
        load_schedule(write(tmp_path, "schedule:\n  stages: [{name: a, recipe: asr/sft}]\n"
                                      "  evaluate: [{recipe: asr/sft, overrides: [data.max_eval_examples=-3]}]\n"))
    with pytest.raises(RecipeError, match=r"schedule.stagez"):
        load_schedule(write(tmp_path, "schedule:\n  stagez: []\n"))


def test_mixture_draws_follow_the_shares_and_never_depend_on_the_length():
    draws = mixture_draws([0.5, 0.3, 0.2], 4000, seed=0)
    assert np.allclose(np.bincount(draws, minlength=3) / 4000, [0.5, 0.3, 0.2], atol=0.03)
    assert (mixture_draws([5, 3, 2], 100, seed=0) == draws[:100]).all(), "shares are normalized; a prefix is a prefix"
    assert not (mixture_draws([0.5, 0.3, 0.2], 100, seed=1) == draws[:100]).all()


def test_matrix_table_shows_what_each_stage_changed():
    matrix = {"rows": [{"row": "start", "metrics": {"asr/eval/wer": 1.0, "tts/eval/cer": 0.9}},
                       {"row": "sft", "metrics": {"asr/eval/wer": 0.3, "tts/eval/cer": 0.5}},
                       {"row": "asr_grpo", "metrics": {"asr/eval/wer": 0.25, "tts/eval/cer": 0.6}}]}
    header, wer, cer = matrix_table(matrix).splitlines()
    assert header.split() == ["metric", "start", "sft", "asr_grpo"]
    assert wer.split()[:3] == ["asr/eval/wer", "1.000", "0.300"] and wer.endswith("0.250 (-0.050)")
    assert cer.startswith("tts/eval/cer") and cer.endswith("0.600 (+0.100)")
