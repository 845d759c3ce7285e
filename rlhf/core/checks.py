"""The checks a recipe passes after it is typed (config.load_recipe calls `validate`): choices,
files that must exist, the range of every numeric knob, shapes vLLM's CPU kernels accept, and what
each mode and algorithm needs. Each failure is a RecipeError naming the key and what to set."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from speechrl.rlhf.core.config import (BUILTIN_TEXTS, PRETRAINED_BACKBONES, TINY_AUDIO_ENCODERS, RecipeConfig,
                                       RecipeError)
from speechrl.rlhf.core.devices import DEVICES, DTYPES
from speechrl.rlhf.core.kernels import CPU_KERNELS
from speechrl.rlhf.core.registry import MODES, REWARD_NAME, Registry

_CHOICES = {
    "algorithm": ("sft", "grpo", "ppo", "dpo", "online_dpo", "reward_model", "mtp_heads"),
    "mtp_heads.targets": ("policy", "reference"),
    "model.mtp.rl_targets": ("greedy", "sampled"),
    "data.on_bad_example": ("skip", "fail"),
    "model.tiny.texts": ("mode", "all_modes"),
    "model.tiny.audio_encoder": TINY_AUDIO_ENCODERS,
    "grpo.dynamic_sampling": ("off", "drop"),
    "tts.embedded_codec.fit_on": ("espeak", "corpus"),
    "train.device": DEVICES,
    "ray.layout": ("colocated", "separate"),
    "rollout.async.on_stale": ("wait", "drop"),
    "ray.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    "train.dtype": ("auto", *DTYPES),
    "rollout.dtype": ("auto", *DTYPES),
    "run.cpu_kernels": CPU_KERNELS,
    "eval_draws": ("same", "per_step"),
    "rl.loss_agg": ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"),
}
_PATHS = ("model.path", "data.train", "data.eval", "data.synthetic.texts", "run.init_from", "tts.codec", "dpo.data",
          "realtime.dialogues")

# Every numeric knob's range, worded as the error states it, then what an edge value means. Floats
# must also be finite; a null where the field allows one is never checked (config.py says what it
# means); a list's rule holds for each item. Checked for every recipe, whether its mode reads the
# knob or not: a nonsense value is an error wherever it sits.
_SEED = "in [0, 4294967295] (numpy's seed range)"
_ESPEAK_RATE = "in [80, 450] (espeak-ng's words per minute)"
_ESPEAK_PITCH = "in [0, 100] (espeak-ng's pitch)"
_RANGES = {
    "seed": _SEED,
    "run.save_rollouts_every": ">= 0 (0 = never)",
    "model.tiny.hidden_size": ">= 1",
    "model.tiny.num_layers": ">= 1",
    "model.tiny.num_heads": ">= 1",
    "model.tiny.num_kv_heads": ">= 1",
    "model.tiny.encoder_layers": ">= 1",
    "model.tiny.encoder_dim": ">= 1",
    "model.tiny.num_codec_tokens": ">= 1",
    "model.tiny.max_audio_seconds": "> 0",
    "model.tiny.text_vocab_size": ">= 256 (the byte alphabet; 256 = no merges)",
    "model.tiny.seed": _SEED,
    "model.lora.r": ">= 1",
    "model.lora.alpha": ">= 1",
    "model.lora.dropout": "in [0, 1)",
    "data.synthetic.num_utterances": ">= 2 (one to train on, one held out)",
    "data.synthetic.heldout_fraction": "in (0, 1)",
    "data.synthetic.rates": _ESPEAK_RATE,
    "data.synthetic.pitches": _ESPEAK_PITCH,
    "data.synthetic.num_texts": ">= 1",
    "data.synthetic.seed": _SEED,
    "data.sample_rate": "in [4000, 192000] (Hz, the rates the audio loader reads)",
    "data.min_seconds": ">= 0 (0 = no minimum)",
    "data.max_seconds": "> 0",
    "data.max_eval_examples": ">= 1",
    "train.steps": ">= 1",
    "train.batch_size": ">= 1",
    "train.max_tokens_per_microbatch": ">= 0 (0 = micro-batches of train.batch_size rows, no token cap)",
    "train.lr": "> 0",
    "train.weight_decay": ">= 0 (0 = none)",
    "train.warmup_steps": ">= 0 (0 = no warm-up)",
    "train.lr_min_ratio": "in [0, 1] (0 = decay to 0, 1 = constant after warm-up)",
    "train.max_grad_norm": "> 0 (gradients are clipped to this norm; there is no 'off')",
    "train.eval_every": ">= 0 (0 = only at the end)",
    "train.checkpoint_every": ">= 0 (0 = only at the end)",
    "train.keep_checkpoints": ">= 0 (0 = keep all)",
    "train.log_every": ">= 0 (0 = only at the end)",
    "train.torch_threads": ">= 0 (0 = all CPUs)",
    "train.deepspeed.zero_stage": "in {0, 1, 2, 3}",
    "train.num_ranks": ">= 1",
    "eval_max_new_tokens": ">= 1",
    "rl.prompts_per_step": ">= 1",
    "rl.clip_eps": "in (0, 1) (the ratio's lower clip is 1 - clip_eps)",
    "rl.clip_eps_high": "> 0",
    "rl.kl_coef": ">= 0 (0 = no KL penalty and no reference model)",
    "rl.epochs_per_step": ">= 1",
    "rl.minibatches": ">= 1",
    "grpo.overlong_buffer": ">= 0 (0 = no overlong punishment)",
    "grpo.overlong_penalty": "> 0",
    "ppo.gamma": "in [0, 1]",
    "ppo.lam": "in [0, 1] (1 = Monte Carlo returns, 0 = one-step TD)",
    "ppo.vf_coef": ">= 0 (0 = the critic does not learn)",
    "ppo.value_clip": ">= 0",
    "ppo.kl_target": "> 0",
    "ppo.kl_horizon": "> 0",
    "rollout.num_workers": ">= 1",
    "rollout.sampling.n": ">= 1",
    "rollout.sampling.temperature": "> 0 (the trainer divides logits by it: greedy is no RL setting)",
    "rollout.sampling.top_p": "in (0, 1] (1 = off)",
    "rollout.sampling.max_new_tokens": ">= 1",
    "rollout.kv_cache_gib": "> 0",
    "rollout.gpu_memory_utilization": "in (0, 1]",
    "rollout.tensor_parallel_size": ">= 1",
    "rollout.max_retries": ">= 0 (0 = no retry)",
    "rollout.max_model_len": ">= 1",
    "rollout.threads_per_worker": ">= 0 (0 = the machine's CPUs shared among the workers)",
    "rollout.mtp_tokens": ">= 0 (0 = plain decoding)",
    "model.mtp.num_heads": ">= 0 (0 = no heads)",
    "model.mtp.num_layers": ">= 1",
    "model.mtp.loss_weight": "> 0",
    "model.mtp.rl_positions": "in (0, 1] (1 = every completion position)",
    "model.freeze_decoder_layers": ">= 0 (0 = none)",
    "rollout.async.max_staleness": ">= 0 (0 = the synchronous loop)",
    "ray.num_cpus": ">= 1",
    "ray.num_gpus": ">= 0",
    "ray.placement_timeout_s": "> 0",
    "asr.ctc_weight": ">= 0 (0 = no CTC loss)",
    "tts.embedded_codec.hop_length": ">= 1",
    "tts.embedded_codec.num_codebooks": ">= 1",
    "tts.embedded_codec.codebook_size": ">= 1",
    "tts.embedded_codec.n_cepstra": "in [1, 80] (the codec's mel bands)",
    "tts.embedded_codec.griffin_lim_iters": ">= 1",
    "tts.embedded_codec.smooth_frames": "in {1,3,5,7,9} (an odd window of frames; 1 = no smoothing)",
    "tts.embedded_codec.fit_clips": ">= 1",
    "tts.max_voice_seconds": ">= 0 (0 = the whole reference clip)",
    "tts.eval_temperature": ">= 0 (0 = greedy)",
    "tts.eval_samples": ">= 0 (0 = none written)",
    "tts.eval_repeats": ">= 1",
    "realtime.dialogues_per_persona": ">= 1",
    "realtime.made_personas": "in [2, 100000] (made: some cards for training, some held out)",
    "realtime.drift_personas": ">= 1 (null = all)",
    "realtime.max_turns": ">= 1",
    "realtime.heldout_fraction": "in (0, 1)",
    "realtime.drift_dialogues_per_persona": ">= 1",
    "realtime.drift_turns": ">= 1",
    "realtime.ooc_threshold": "finite (compared with the drift judge's scores, on its scale)",
    "realtime.max_text_tokens": ">= 0 (0 = the reply's audio starts at once)",
    "realtime.user_rate": _ESPEAK_RATE,
    "realtime.reply_rate": _ESPEAK_RATE,
    "realtime.reply_pitch": _ESPEAK_PITCH,
    "duplex.chunk_seconds": "in [0.04, 2] (a whole number of codec frames)",
    "duplex.dialogues_per_kind": ">= 1",
    "duplex.heldout_per_kind": ">= 1",
    "duplex.max_action_tokens": ">= 0 (0 = no tool calls)",
    "duplex.event_repeats": "in [1, 100] (1 = every chunk once)",
    "duplex.call_repeats": "in [1, 100] (1 = once)",
    "duplex.recovery_repeats": "in [0, 100] (0 = none)",
    "duplex.eval_temperature": ">= 0 (0 = greedy)",
    "duplex.user_rates": _ESPEAK_RATE,
    "duplex.reply_rate": _ESPEAK_RATE,
    "duplex.seed": _SEED,
    "dpo.beta": "> 0",
    "dpo.label_smoothing": "in [0, 0.5) (0 = plain DPO; 0.5 would teach nothing)",
    "dpo.sft_weight": ">= 0 (0 = pure DPO)",
    "dpo.min_reward_gap": ">= 0 (0 = any strict difference)",
    "reward_model.eval_fraction": "in (0, 1)",
    "reward_model.center_coef": ">= 0 (0 = no centering term)",
    "mtp_heads.max_examples": ">= 0 (0 = the whole training set)",
}
# the same for each entry of `rewards`, as rewards.<i>.<key>
_RESOURCES = "(a reward's resources: num_cpus, num_gpus and memory_gib >= 0, replicas >= 1)"
_REWARD_RANGES = {
    "weight": "finite (negative = a penalty, 0 = logged but not counted)",
    "resources.num_cpus": f">= 0 {_RESOURCES}",
    "resources.num_gpus": f">= 0 {_RESOURCES}",
    "resources.memory_gib": f">= 0 {_RESOURCES}",
    "resources.replicas": f">= 1 {_RESOURCES}",
}
_RULE = re.compile(r"(?P<op>>=|>) (?P<bound>\S+)|in (?P<open>[\[(])(?P<low>\S+), (?P<high>\S+?)(?P<close>[\])])"
                   r"|in \{(?P<set>[^}]*)\}|finite")


def registered_modes() -> Registry:
    """The mode registry, filled: the built-in modes register themselves when their package is
    imported, by name here, as an outside package's rewards are found by entry point, so that
    core stays below the modes it validates."""
    import importlib

    importlib.import_module("speechrl.rlhf.modes")
    return MODES


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):  # `rollout.async` is the field async_ (config.py: _KEYWORD_KEYS)
        cfg = getattr(cfg, part) if part != "async" else getattr(cfg, "async_")
    return cfg


def _holds(rule: str, value: float) -> bool:
    """Whether `value` keeps `rule`, a range as _RANGES words it (its leading words; the rest says why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    m = _RULE.match(rule)
    if m["op"]:
        return value > float(m["bound"]) if m["op"] == ">" else value >= float(m["bound"])
    if m["low"]:
        low, high = float(m["low"]), float(m["high"])
        above = low <= value if m["open"] == "[" else low < value
        below = value <= high if m["close"] == "]" else value < high
        return above and below
    if m["set"] is not None:
        return value in {int(x) for x in m["set"].split(",")}
    return True  # "finite"


def check_ranges(cfg: Any, source: str = "recipe") -> None:
    """Every numeric knob within its range (_RANGES); `cfg` is the typed RecipeConfig or the merged tree."""
    knobs = [(key, _get(cfg, key), rule) for key, rule in _RANGES.items()]
    knobs += [(f"rewards.{i}.{key}", _get(spec, key), rule) for i, spec in enumerate(cfg.rewards)
              for key, rule in _REWARD_RANGES.items()]
    for key, value, rule in knobs:
        if value is None:
            continue
        items = [value] if isinstance(value, (int, float)) else list(value)
        if all(_holds(rule, v) for v in items):
            continue
        finite = "" if rule.startswith("finite") or all(math.isfinite(v) for v in items) else "finite and "
        raise RecipeError(f"{source}: `{key}` must be {finite}{rule}, got {value}")


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
        if key == "data.synthetic.texts" and value in BUILTIN_TEXTS:
            continue
        if value is not None and not Path(os.path.expanduser(value)).exists():
            raise RecipeError(f"{source}: `{key}` points to {value!r}, which does not exist")
    check_ranges(cfg, source)
    _validate_tiny_backbone(cfg, source)
    _validate_lengths(cfg, source)
    texts = cfg.tts.prompt_texts
    if texts and texts not in ("grammar", "corpus") and not Path(os.path.expanduser(texts)).is_file():
        raise RecipeError(f"{source}: `tts.prompt_texts` is {texts!r}: neither \"grammar\", \"corpus\" nor a text file")
    _validate_reward_model(cfg, source)
    _validate_ppo(cfg, source)
    _validate_ranks(cfg, source)
    _validate_mtp(cfg, source)
    # the algorithm's own section (`mtp_heads:`, ...) checks what it needs of the rest, where it has a check
    section_check = getattr(getattr(cfg, cfg.algorithm, None), "check", None)
    if section_check is not None:
        section_check(cfg, source)
    modes.get(cfg.mode).check(cfg, source)


ONLINE_ALGORITHMS = ("grpo", "ppo", "online_dpo")


def _validate_ranks(cfg: RecipeConfig, source: str) -> None:
    ranks = cfg.train.num_ranks
    if ranks > 1 and cfg.algorithm not in ONLINE_ALGORITHMS:
        raise RecipeError(f"{source}: `train.num_ranks`={ranks} shards the policy worker of an online run "
                          f"({', '.join(ONLINE_ALGORITHMS)}); algorithm={cfg.algorithm} trains in one process: "
                          "set train.num_ranks=1")
    if ranks > 1 and cfg.train.deepspeed.enabled:
        raise RecipeError(f"{source}: `train.num_ranks`={ranks} shards the policy with torch FSDP2, which replaces "
                          "DeepSpeed here: set train.deepspeed.enabled=false (DeepSpeed runs one rank)")


def _validate_tiny_backbone(cfg: RecipeConfig, source: str) -> None:
    """The embedded backbone's shape: what its attention and its audio window need."""
    tiny = cfg.model.tiny
    widths = [(tiny.hidden_size, "model.tiny.hidden_size")]
    if tiny.audio_encoder == "random":
        widths.append((tiny.encoder_dim, "model.tiny.encoder_dim"))
    elif cfg.data.sample_rate != 16000:
        raise RecipeError(f"{source}: `model.tiny.audio_encoder`={tiny.audio_encoder} hears 16 kHz audio, but "
                          f"`data.sample_rate` is {cfg.data.sample_rate}; set it to 16000")
    for width, key in widths:
        if width % tiny.num_heads or width // tiny.num_heads < 32:
            raise RecipeError(f"{source}: `{key}`={width} with `model.tiny.num_heads`={tiny.num_heads} gives "
                              "head_dim < 32 or a remainder; vLLM's CPU attention needs head_dim >= 32")
    if tiny.num_heads % tiny.num_kv_heads:
        raise RecipeError(f"{source}: `model.tiny.num_kv_heads`={tiny.num_kv_heads} must divide "
                          f"`model.tiny.num_heads`={tiny.num_heads} (grouped-query attention)")
    if tiny.max_audio_seconds * 100 % 4:  # the same test as the backbone's build (model/backbone.py)
        raise RecipeError(f"{source}: `model.tiny.max_audio_seconds` must be a multiple of 0.04 s (the encoder "
                          f"halves 10 ms frames twice), got {tiny.max_audio_seconds}")


def _validate_lengths(cfg: RecipeConfig, source: str) -> None:
    """Decoding stays inside the engines' context; the clip length limits leave some clips."""
    for key in ("rollout.sampling.max_new_tokens", "eval_max_new_tokens"):
        if _get(cfg, key) >= cfg.rollout.max_model_len:
            raise RecipeError(f"{source}: `{key}`={_get(cfg, key)} leaves no room for the prompt in "
                              f"`rollout.max_model_len`={cfg.rollout.max_model_len}; lower it or raise max_model_len")
    data = cfg.data
    if data.max_seconds is not None and data.max_seconds <= data.min_seconds:
        raise RecipeError(f"{source}: `data.max_seconds`={data.max_seconds} must be > "
                          f"`data.min_seconds`={data.min_seconds}, or every clip is a bad example")


def _validate_mtp(cfg: RecipeConfig, source: str) -> None:
    """Verified decoding drafts with heads the policy trains and syncs (model/mtp.py)."""
    k, heads = cfg.rollout.mtp_tokens, cfg.model.mtp.num_heads
    if k > heads:
        raise RecipeError(f"{source}: `rollout.mtp_tokens`={k} drafts with more heads than "
                          f"`model.mtp.num_heads`={heads}; lower it or train more heads")
    if k and not mtp_trainable(cfg):
        raise RecipeError(f"{source}: `rollout.mtp_tokens`={k}: MTP heads train on one plain rank only, not with "
                          "train.num_ranks > 1 or train.deepspeed.enabled; set rollout.mtp_tokens=0")


def mtp_trainable(cfg: RecipeConfig) -> bool:
    """Whether this run's trainer can carry MTP heads: one rank, no DeepSpeed (not supported yet)."""
    return cfg.train.num_ranks == 1 and not cfg.train.deepspeed.enabled


def _validate_ppo(cfg: RecipeConfig, source: str) -> None:
    p = cfg.ppo
    if p.kl_target is not None and cfg.rl.kl_coef <= 0:
        raise RecipeError(f"{source}: adaptive KL (`ppo.kl_target`={p.kl_target}) needs a starting "
                          f"`rl.kl_coef` > 0 (got {cfg.rl.kl_coef})")


def _validate_reward_model(cfg: RecipeConfig, source: str) -> None:
    import glob

    rm = cfg.reward_model
    if rm.data is not None and not glob.glob(os.path.expanduser(rm.data)):
        raise RecipeError(f"{source}: `reward_model.data` is {rm.data!r}: no file or folder matches it")
    if rm.register_as is not None and not REWARD_NAME.fullmatch(rm.register_as):
        raise RecipeError(f"{source}: `reward_model.register_as` is {rm.register_as!r}; use letters, digits, _ and -")
