"""Schedule recipes (`recipes/multi/`): one backbone through a list of stages, each a mode × algorithm.

A schedule file holds one top-level `schedule:` mapping, typed by `ScheduleConfig` and validated when
it is loaded, as recipes are. Every stage names shipped recipes (or recipe files); the schedule's
`shared` overrides go to every stage and every evaluation, which is how all of them start from one
backbone (`model.tiny.texts=all_modes`) and speak through one codec. Each stage's recipe is loaded
and checked here too, so a typo in stage 5 stops the run before stage 1 starts. What runs them:
trainers/schedule.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from speechrl.rlhf.core.config import RecipeConfig, RecipeError, _load_tree, load_recipe, resolve_recipe_path


@dataclass
class StageConfig:
    name: str = ""  # the stage's run directory is stages/<NN>-<name>; letters, digits, _ and -
    recipe: Optional[str] = None  # one recipe (a shipped name such as asr/grpo, or a file); or use `mix`
    # several recipes of one stage, each with its share of the stage's steps (ratios, normalized). SFT
    # recipes mix batch by batch in one run; RL recipes take turns, `rounds` times, each turn a run of
    # its own that starts from the last one's weights (interleaved by ratio)
    mix: dict[str, float] = field(default_factory=dict)
    rounds: int = 1  # RL mix: how many times the recipes take turns (>= 1)
    steps: int = 0  # optimizer steps of the stage (a mix: all its recipes together); 0 = the recipe's own train.steps
    overrides: list[str] = field(default_factory=list)  # key.path=value for this stage's recipes, after `shared`


@dataclass
class EvaluationConfig:
    recipe: str = ""  # whose held-out set and metric: asr/sft (WER), tts/sft (judged CER), realtime/sft (reply loss), ...
    overrides: list[str] = field(default_factory=list)  # after `shared`: a smaller held-out set, fewer repeats
    # false: in this process, as SFT evaluates (ASR WER, TTS judge CER, realtime reply loss); true: on
    # vLLM engines serving the checkpoint, as an RL run evaluates (realtime/ppo: drift, the judge's score)
    on_engines: bool = False


@dataclass
class ScheduleConfig:
    name: str = "multi"  # the run directory is <output_dir>/<name>-<timestamp> (or run.name when given)
    output_dir: str = "runs"  # parent of the schedule's run directory
    init_from: Optional[str] = None  # the first stage's starting weights; null = the recipes' backbone (shared)
    shared: list[str] = field(default_factory=list)  # key.path=value for every stage and evaluation
    stages: list[StageConfig] = field(default_factory=list)
    # every mode's held-out metric after every stage (and at the start): the interference matrix
    evaluate: list[EvaluationConfig] = field(default_factory=list)


_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def is_schedule(name: str) -> bool:
    """Whether a recipe name or file is a schedule (a `schedule:` mapping) rather than one recipe."""
    return "schedule" in _load_tree(resolve_recipe_path(name))


def load_schedule(name: str, overrides: list[str] = ()) -> ScheduleConfig:
    """Load and check a schedule. An override `schedule.key=value` changes the schedule itself
    (`schedule.stages.1.steps=5`); any other `key.path=value` joins `shared`, so it reaches every stage."""
    path = resolve_recipe_path(name)
    tree = _load_tree(path)
    if set(tree.keys()) != {"schedule"} or not isinstance(tree.schedule, DictConfig):
        raise RecipeError(f"{path}: a schedule file holds one `schedule:` mapping (stages, shared, evaluate); "
                          f"found keys {', '.join(map(str, tree.keys()))}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ScheduleConfig), tree.schedule)
        for item in overrides:
            key, sep, _ = item.partition("=")
            if not sep:
                raise RecipeError(f"override {item!r} must look like key.path=value")
            if key.startswith("schedule."):
                cfg.merge_with_dotlist([item[len("schedule."):]])
        schedule: ScheduleConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise RecipeError(f"{path}: bad value at `schedule.{getattr(e, 'full_key', '?')}`: {getattr(e, 'msg', e)}") from None
    schedule.shared += [o for o in overrides if not o.partition("=")[0].startswith("schedule.")]
    check_schedule(schedule, str(path))
    return schedule


def stage_recipes(stage: StageConfig) -> dict[str, float]:
    """The stage's recipes and their shares of its steps (normalized to 1)."""
    if stage.recipe:
        return {stage.recipe: 1.0}
    total = sum(stage.mix.values())
    return {name: share / total for name, share in stage.mix.items()}


def stage_recipe(schedule: ScheduleConfig, recipe: str, stage: StageConfig, extra: list[str] = ()) -> RecipeConfig:
    """One recipe of a stage with the schedule's shared overrides, then the stage's, then `extra`."""
    return load_recipe(recipe, [*schedule.shared, *stage.overrides, *extra])


def check_schedule(schedule: ScheduleConfig, source: str) -> None:
    """Names, shares and step counts, then every stage's and evaluation's recipe loaded and checked."""
    if not _NAME.match(schedule.name):
        raise RecipeError(f"{source}: `schedule.name` is {schedule.name!r}; use letters, digits, _ and -")
    if not schedule.stages:
        raise RecipeError(f"{source}: `schedule.stages` is empty; list at least one stage (recipe or mix, steps)")
    seen = set()
    for i, stage in enumerate(schedule.stages):
        where = f"{source}: `schedule.stages.{i}"  # each message closes the backquote
        if not _NAME.match(stage.name) or stage.name in seen:
            raise RecipeError(f"{where}.name` is {stage.name!r}: give each stage its own name of letters, digits, _ and -")
        seen.add(stage.name)
        if bool(stage.recipe) == bool(stage.mix):
            raise RecipeError(f"{where}` needs exactly one of `recipe` (one recipe) or `mix` (recipes and their shares)")
        if any(not (share > 0) for share in stage.mix.values()):
            raise RecipeError(f"{where}.mix` shares must be > 0, got {dict(stage.mix)}")
        if stage.steps < 0 or stage.rounds < 1:
            raise RecipeError(f"{where}`: `steps` must be >= 0 (0 = the recipe's own) and `rounds` >= 1, "
                              f"got steps={stage.steps}, rounds={stage.rounds}")
        algorithms = set()
        for recipe in stage_recipes(stage):
            try:
                cfg = stage_recipe(schedule, recipe, stage)
            except RecipeError as e:
                raise RecipeError(f"{where}` ({recipe}): {e}") from None
            algorithms.add(cfg.algorithm)
        if stage.mix and (len(algorithms) > 1 or (algorithms == {"sft"} and stage.rounds != 1)):
            raise RecipeError(f"{where}.mix` mixes {', '.join(sorted(algorithms))} recipes: a mix is all SFT "
                              "(batch by batch in one run, rounds 1) or all RL (taking turns for `rounds`)")
        if stage.mix and algorithms & {"dpo", "reward_model"}:
            raise RecipeError(f"{where}.mix`: {', '.join(sorted(algorithms))} recipes read a pairs file, "
                              "not a mode's data: give them a stage of their own")
        if stage.mix and algorithms != {"sft"} and stage.steps and stage.steps < stage.rounds * len(stage.mix):
            raise RecipeError(f"{where}.steps`={stage.steps} leaves a turn with no step: "
                              f"{stage.rounds} rounds × {len(stage.mix)} recipes need at least that many")
    for i, evaluation in enumerate(schedule.evaluate):
        try:
            load_recipe(evaluation.recipe, [*schedule.shared, *evaluation.overrides])
        except RecipeError as e:
            raise RecipeError(f"{source}: `schedule.evaluate.{i}` ({evaluation.recipe}): {e}") from None
