"""Every numeric knob of every shipped recipe at its edges: 0, -1, a huge value and (floats) NaN.
Loading either keeps a value that EDGES_ALLOWED below says is meaningful, or fails with a
RecipeError naming the key; any other exception is a bug."""
from __future__ import annotations

import copy
import dataclasses
import functools
import subprocess
import sys
import typing

import pytest

from speechrl.rlhf.core import config
from speechrl.rlhf.core.checks import validate
from speechrl.rlhf.core.config import RECIPES_DIR, RecipeConfig, RecipeError, load_recipe

SHIPPED = sorted(str(p.relative_to(RECIPES_DIR))[: -len(".yaml")] for p in RECIPES_DIR.rglob("*.yaml")
                 if p.name != "base.yaml" and "schedule:" not in p.read_text())  # schedules: test_schedule.py
EDGES = {"0": 0, "-1": -1, "huge": 10**12, "nan": float("nan")}

# The edges each knob may take; every other edge must be refused. "huge" here means no upper bound
# is known when the recipe loads (the backbone, the machine or the data decide), not that it is wise.
EDGES_ALLOWED = {
    "seed": {"0"},
    "rollout.async.max_staleness": {"0", "huge"},  # 0 = the synchronous loop; huge = no bound (wait never waits)
    "run.save_rollouts_every": {"0", "huge"},  # 0 = never
    "model.tiny.hidden_size": {"huge"},
    "model.tiny.num_layers": {"huge"},
    "model.tiny.num_heads": set(),  # huge: head_dim < 32
    "model.tiny.num_kv_heads": set(),  # huge: does not divide num_heads
    "model.tiny.encoder_layers": {"huge"},
    "model.tiny.encoder_dim": {"huge"},
    "model.tiny.num_codec_tokens": {"huge"},
    "model.tiny.max_audio_seconds": {"huge"},
    "model.tiny.text_vocab_size": {"huge"},  # the BPE stops when the corpus has no more merges
    "model.tiny.seed": {"0"},
    "model.mtp.num_heads": {"0", "huge"},  # 0 = no heads
    "model.mtp.num_layers": {"huge"},  # the machine decides how deep a head fits
    "model.mtp.loss_weight": {"huge"},
    "model.mtp.rl_positions": set(),
    "model.freeze_decoder_layers": {"0", "huge"},  # 0 = none; the backbone's depth bounds it (checked at build)
    "rollout.mtp_tokens": {"0"},  # 0 = plain decoding; huge: more than model.mtp.num_heads
    "model.lora.r": {"huge"},
    "model.lora.alpha": {"huge"},
    "model.lora.dropout": {"0"},
    "data.synthetic.num_utterances": {"huge"},
    "data.synthetic.heldout_fraction": set(),
    "data.synthetic.rates": set(),
    "data.synthetic.pitches": {"0"},
    "data.synthetic.num_texts": {"huge"},
    "data.synthetic.seed": {"0"},
    "data.sample_rate": set(),
    "data.min_seconds": {"0", "huge"},  # 0 = no minimum
    "data.max_seconds": {"huge"},
    "data.max_eval_examples": {"huge"},
    "train.steps": {"huge"},
    "train.batch_size": {"huge"},
    "train.lr": {"huge"},
    "train.weight_decay": {"0", "huge"},  # 0 = none
    "train.warmup_steps": {"0", "huge"},  # 0 = no warm-up
    "train.lr_min_ratio": {"0"},  # 0 = decay to 0
    "train.max_grad_norm": {"huge"},
    "train.eval_every": {"0", "huge"},  # 0 = only at the end
    "train.checkpoint_every": {"0", "huge"},
    "train.keep_checkpoints": {"0", "huge"},  # 0 = keep all
    "train.log_every": {"0", "huge"},
    "train.max_tokens_per_microbatch": {"0", "huge"},  # 0 = no token cap
    "train.torch_threads": {"0", "huge"},  # 0 = all CPUs
    "train.deepspeed.zero_stage": {"0"},
    "train.num_ranks": {"huge"},  # online recipes; the placement check refuses more ranks than the cluster holds
    "eval_max_new_tokens": set(),  # huge: past rollout.max_model_len
    "rl.prompts_per_step": {"huge"},
    "rl.clip_eps": set(),
    "rl.clip_eps_high": {"huge"},
    "rl.kl_coef": {"0", "huge"},  # 0 = no KL penalty, no reference
    "rl.epochs_per_step": {"huge"},
    "rl.minibatches": {"huge"},
    "grpo.overlong_buffer": {"0", "huge"},  # 0 = off; huge: GRPO recipes refuse it (over max_new_tokens)
    "grpo.overlong_penalty": {"huge"},
    "ppo.gamma": {"0"},
    "ppo.lam": {"0"},  # 0 = one-step TD
    "ppo.vf_coef": {"0", "huge"},
    "ppo.value_clip": {"0", "huge"},
    "ppo.kl_target": {"huge"},
    "ppo.kl_horizon": {"huge"},
    "rollout.num_workers": {"huge"},
    "rollout.sampling.n": {"huge"},
    "rollout.sampling.temperature": {"huge"},
    "rollout.sampling.top_p": set(),
    "rollout.sampling.max_new_tokens": set(),  # huge: past rollout.max_model_len
    "rollout.kv_cache_gib": {"huge"},
    "rollout.gpu_memory_utilization": set(),
    "rollout.tensor_parallel_size": {"huge"},
    "rollout.max_retries": {"0", "huge"},  # 0 = no retry
    "rollout.max_model_len": {"huge"},
    "rollout.threads_per_worker": {"0", "huge"},  # 0 = the CPUs shared among the workers
    "rewards.*.weight": {"0", "-1", "huge"},  # 0 = logged only, negative = a penalty
    "rewards.*.resources.num_cpus": {"0", "huge"},
    "rewards.*.resources.num_gpus": {"0", "huge"},
    "rewards.*.resources.memory_gib": {"0", "huge"},
    "rewards.*.resources.replicas": {"huge"},
    "ray.num_cpus": {"huge"},
    "ray.num_gpus": {"0", "huge"},  # 0 = a CPU cluster even where GPUs are found
    "ray.placement_timeout_s": {"huge"},
    "tts.embedded_codec.hop_length": {"huge"},
    "tts.embedded_codec.num_codebooks": {"huge"},
    "tts.embedded_codec.codebook_size": {"huge"},
    "tts.embedded_codec.n_cepstra": set(),
    "tts.embedded_codec.griffin_lim_iters": {"huge"},
    "tts.embedded_codec.smooth_frames": set(),
    "tts.embedded_codec.fit_clips": {"huge"},  # the whole training manifest
    "tts.max_voice_seconds": {"0", "huge"},  # 0 = not cut
    "tts.eval_temperature": {"0", "huge"},  # 0 = greedy
    "asr.ctc_weight": {"0", "huge"},  # 0 = no CTC loss
    "tts.eval_samples": {"0", "huge"},  # 0 = none written
    "tts.eval_repeats": {"huge"},
    "realtime.dialogues_per_persona": {"huge"},
    "realtime.made_personas": set(),  # generated when the run starts: a bound, not a hang
    "realtime.drift_personas": {"huge"},  # at most that many: all the held-out cards
    "realtime.max_turns": {"huge"},
    "realtime.heldout_fraction": set(),
    "realtime.drift_dialogues_per_persona": {"huge"},
    "realtime.drift_turns": {"huge"},
    "realtime.ooc_threshold": {"0", "-1", "huge"},  # on the drift judge's own scale
    "realtime.max_text_tokens": {"0", "huge"},  # 0 = the audio starts at once
    "realtime.user_rate": set(),
    "realtime.reply_rate": set(),
    "duplex.chunk_seconds": set(),  # a whole number of codec frames, at most 2 s
    "duplex.dialogues_per_kind": {"huge"},
    "duplex.heldout_per_kind": {"huge"},
    "duplex.max_action_tokens": {"0", "huge"},  # 0 = no tool calls (refused with the tool kind); huge: max_new_tokens refuses it
    "duplex.event_repeats": set(),
    "duplex.call_repeats": set(),
    "duplex.recovery_repeats": {"0"},  # 0 = no recovery examples
    "duplex.eval_temperature": {"0", "huge"},  # 0 = greedy
    "duplex.user_rates": set(),
    "duplex.reply_rate": set(),
    "duplex.seed": {"0"},
    "realtime.reply_pitch": {"0"},
    "dpo.beta": {"huge"},
    "dpo.label_smoothing": {"0"},
    "dpo.sft_weight": {"0", "huge"},  # 0 = pure DPO
    "dpo.min_reward_gap": {"0", "huge"},
    "reward_model.eval_fraction": set(),
    "reward_model.center_coef": {"0", "huge"},
    "mtp_heads.max_examples": {"0", "huge"},  # 0 = the whole training set; huge: all of it too
}


def numeric_knobs(cls: type, prefix: str = "", cfg=None):
    """(key, number type, is a list) of every int/float knob, Optional ones and lists of numbers
    included, from the dataclasses' annotations; `rewards` gives one set per reward of `cfg`."""
    hints = typing.get_type_hints(cls, vars(config))
    for f in dataclasses.fields(cls):
        kind, key = hints[f.name], prefix + f.name
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        many = typing.get_origin(kind) is list
        if dataclasses.is_dataclass(kind):
            yield from numeric_knobs(kind, key + ".", cfg)
        elif many and dataclasses.is_dataclass(args[0]):
            for i in range(len(cfg.rewards) if cfg is not None else 1):
                yield from numeric_knobs(args[0], f"{key}.{i}.")
        elif (args[0] if args else kind) in (int, float):
            yield key, args[0] if args else kind, many


def generic(key: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in shown(key).split("."))


def shown(key: str) -> str:
    """A field's key as recipes and errors write it (`rollout.async_` is `rollout.async`)."""
    return key.replace("async_", "async")


def set_knob(cfg, key: str, value) -> None:
    *path, last = key.split(".")
    for part in path:
        cfg = cfg[int(part)] if part.isdigit() else getattr(cfg, part)
    setattr(cfg, last, value)


def edges(kind: type, many: bool):
    """(edge name, value) of a knob of type `kind`; a list knob gets a one-item list."""
    for name, value in EDGES.items():
        if kind is int and name == "nan":
            continue
        value = kind(value) if kind is float else value
        yield name, [value] if many else value


@functools.cache
def sweep(recipe: str) -> dict[tuple[str, str], str | None]:
    """(knob, edge) -> None if the recipe loads with it, else the RecipeError. The typed config is
    changed and validated as load_recipe does after typing (test_overrides_agree_with_the_sweep)."""
    cfg = load_recipe(recipe)
    outcomes = {}
    for key, kind, many in numeric_knobs(RecipeConfig, cfg=cfg):
        for name, value in edges(kind, many):
            trial = copy.deepcopy(cfg)
            set_knob(trial, key, value)
            try:
                validate(trial, source=recipe)
                outcomes[key, name] = None
            except RecipeError as e:
                outcomes[key, name] = str(e)
    return outcomes


def test_every_numeric_knob_has_its_edges_decided():
    knobs = {generic(key) for key, _, _ in numeric_knobs(RecipeConfig)}
    assert knobs == set(EDGES_ALLOWED), "a numeric knob without a rule in checks._RANGES and its edges here"


@pytest.mark.parametrize("recipe", SHIPPED)
def test_edges_load_only_when_meaningful(recipe):
    wrong = []
    for (key, edge), error in sweep(recipe).items():
        if error is None and edge not in EDGES_ALLOWED[generic(key)]:
            wrong.append(f"{key}={edge} accepted")
        if error is not None and f"`{shown(key)}`" not in error:
            wrong.append(f"{key}={edge}: the error does not name `{key}`: {error}")
    assert not wrong, "\n".join(wrong)


def test_meaningful_edges_are_accepted():
    """Each edge EDGES_ALLOWED names loads in some shipped recipe: validation is not stricter than documented."""
    accepted = {(generic(key), edge) for recipe in SHIPPED for (key, edge), error in sweep(recipe).items()
                if error is None}
    missing = sorted((key, edge) for key, allowed in EDGES_ALLOWED.items() for edge in allowed
                     if (key, edge) not in accepted)
    assert not missing, f"refused, though documented as meaningful: {missing}"


def test_overrides_agree_with_the_sweep():
    """Through load_recipe's overrides (the typing, RewardResources' own check), -1 and NaN in
    every knob give what the sweep found."""
    recipe = "realtime/ppo"  # four rewards, one with resources
    for key, kind, many in numeric_knobs(RecipeConfig, cfg=load_recipe(recipe)):
        for name, value in edges(kind, many):
            if name not in ("-1", "nan"):
                continue
            try:
                load_recipe(recipe, [f"{shown(key)}={value}"])
                error = None
            except RecipeError as e:
                error = str(e)
            assert (error is None) == (sweep(recipe)[key, name] is None), (key, name, error)
            assert error is None or f"`{shown(key)}`" in error, error


def test_the_cli_names_a_bad_knob_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "speechrl.rlhf.cli", "show", "asr/sft", "train.lr=-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.startswith("speechrl: error:") and "`train.lr` must be > 0" in proc.stderr
    assert "Traceback" not in proc.stderr
