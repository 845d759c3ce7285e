"""The checks a recipe passes after it is typed (config.load_recipe calls `validate`): choices,
files that must exist, positive counts, shapes vLLM's CPU kernels accept, and what each mode and
algorithm needs. Each failure is a RecipeError naming the key and what to set."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from speechrl.rlhf.core.config import GENERATED_TEXTS, PRETRAINED_BACKBONES, RecipeConfig, RecipeError
from speechrl.rlhf.core.registry import MODES, REWARD_NAME, Registry

_CHOICES = {
    "algorithm": ("sft", "grpo", "ppo", "dpo", "online_dpo", "reward_model"),
    "data.on_bad_example": ("skip", "fail"),
    "rl.loss_agg": ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"),
}
_PATHS = ("model.path", "data.train", "data.eval", "data.synthetic.texts", "run.init_from", "tts.codec", "dpo.data",
          "realtime.dialogues")


def registered_modes() -> Registry:
    """The mode registry, filled: the built-in modes register themselves when their package is
    imported, by name here, as an outside package's rewards are found by entry point, so that
    core stays below the modes it validates."""
    import importlib

    importlib.import_module("speechrl.rlhf.modes")
    return MODES


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: RecipeConfig, source: str = "recipe") -> None:
    """Checks that the type system cannot: choices, files, ranges; then the mode's own checks."""
    modes = registered_modes()
    if cfg.mode not in modes:
        raise RecipeError(f"{source}: `mode` is {cfg.mode!r}; choose one of {', '.join(modes.names())}")
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise RecipeError(f"{source}: `{key}` is {_get(cfg, key)!r}; choose one of {', '.join(choices)}")
    if cfg.model.pretrained is not None and cfg.model.pretrained not in PRETRAINED_BACKBONES:
        raise RecipeError(f"{source}: `model.pretrained` is {cfg.model.pretrained!r}; choose one of "
                          f"{', '.join(PRETRAINED_BACKBONES)} (see `speechrl recipes`), or null")
    for key in _PATHS:
        value = _get(cfg, key)
        if key == "data.synthetic.texts" and value == GENERATED_TEXTS:
            continue
        if value is not None and not Path(os.path.expanduser(value)).exists():
            raise RecipeError(f"{source}: `{key}` points to {value!r}, which does not exist")
    tiny = cfg.model.tiny
    for width, key in ((tiny.hidden_size, "model.tiny.hidden_size"), (tiny.encoder_dim, "model.tiny.encoder_dim")):
        if width % tiny.num_heads or width // tiny.num_heads < 32:
            raise RecipeError(f"{source}: `{key}`={width} with {tiny.num_heads} heads gives head_dim < 32 "
                              "or a remainder; vLLM's CPU attention needs head_dim >= 32")
    positive = ("train.steps", "train.batch_size", "rollout.sampling.n", "rl.prompts_per_step", "rl.minibatches",
                "rl.epochs_per_step", "rollout.num_workers", "rollout.sampling.max_new_tokens")
    for key in positive:
        if _get(cfg, key) < 1:
            raise RecipeError(f"{source}: `{key}` must be >= 1, got {_get(cfg, key)}")
    for key, zero in (("train.eval_every", "only at the end"), ("train.checkpoint_every", "only at the end"),
                      ("train.log_every", "only at the end"), ("run.save_rollouts_every", "never")):
        if _get(cfg, key) < 0:
            raise RecipeError(f"{source}: `{key}` must be >= 0 (0 = {zero}), got {_get(cfg, key)}")
    if not 0.0 < cfg.data.synthetic.heldout_fraction < 1.0:
        raise RecipeError(f"{source}: `data.synthetic.heldout_fraction` must be in (0, 1)")
    texts = cfg.tts.prompt_texts
    if texts and texts != "grammar" and not Path(os.path.expanduser(texts)).is_file():
        raise RecipeError(f"{source}: `tts.prompt_texts` is {texts!r}: neither \"grammar\" nor a text file")
    _validate_reward_model(cfg, source)
    _validate_ppo(cfg, source)
    modes.get(cfg.mode).check(cfg, source)


def _validate_ppo(cfg: RecipeConfig, source: str) -> None:
    p = cfg.ppo
    if not (0 <= p.gamma <= 1 and 0 <= p.lam <= 1):
        raise RecipeError(f"{source}: `ppo.gamma` and `ppo.lam` must be in [0, 1]; got {p.gamma}, {p.lam}")
    if p.vf_coef < 0 or (p.value_clip is not None and p.value_clip < 0):
        raise RecipeError(f"{source}: `ppo.vf_coef` and `ppo.value_clip` must be >= 0")
    if p.kl_target is not None and (p.kl_target <= 0 or cfg.rl.kl_coef <= 0):
        raise RecipeError(f"{source}: adaptive KL (`ppo.kl_target`={p.kl_target}) needs kl_target > 0 and a starting "
                          f"`rl.kl_coef` > 0 (got {cfg.rl.kl_coef})")


def _validate_reward_model(cfg: RecipeConfig, source: str) -> None:
    import glob

    rm = cfg.reward_model
    if rm.data is not None and not glob.glob(os.path.expanduser(rm.data)):
        raise RecipeError(f"{source}: `reward_model.data` is {rm.data!r}: no file or folder matches it")
    if not 0.0 < rm.eval_fraction < 1.0:
        raise RecipeError(f"{source}: `reward_model.eval_fraction` must be in (0, 1), got {rm.eval_fraction}")
    if rm.center_coef < 0:
        raise RecipeError(f"{source}: `reward_model.center_coef` must be >= 0, got {rm.center_coef}")
    if rm.register_as is not None and not REWARD_NAME.fullmatch(rm.register_as):
        raise RecipeError(f"{source}: `reward_model.register_as` is {rm.register_as!r}; use letters, digits, _ and -")
