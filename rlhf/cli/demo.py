"""`speechrl demo [asr|tts|realtime]`: a mode's story end to end on the embedded default.

Builds (once) a tiny random backbone, the mode's data, codec and embedded judges, then SFT, then the
mode's RL recipe as shipped through Ray + vLLM, then the before/after report, so one command shows the
whole pipeline works. The realtime judge is SmolLM2 trained here as a persona judge (rewards/trained_judge.py).
"""
from __future__ import annotations

import time

from speechrl.rlhf.core.config import load_recipe
from speechrl.rlhf.core.registry import MODES


def run_demo(overrides: list[str], output_dir: str = "runs", mode: str = "asr") -> dict:
    from speechrl.rlhf.trainers.runners import RUNNERS
    from speechrl.rlhf.core.checks import registered_modes
    from speechrl.rlhf.trainers.judges import needs_judges, prebuild_judges

    if mode == "multi":
        return run_multi_demo(overrides, output_dir)
    if mode not in registered_modes():
        raise ValueError(f"demo: no demo for mode {mode!r}; choose one of {', '.join(MODES.names())} or multi")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # the README's numbers on any x86 CPU: every stage on the pinned kernels, whatever a recipe chooses
    common = [f"run.output_dir={output_dir}", "run.cpu_kernels=pinned", *overrides]
    start = time.time()
    cls = MODES.get(mode)
    algorithm = cls.default_algorithm
    sft_cfg = load_recipe(f"{mode}/sft", [*cls.demo_sft_overrides, f"run.name={mode}-demo-{stamp}-sft", *common])
    rl_cfg = load_recipe(f"{mode}/{algorithm}", [f"run.name={mode}-demo-{stamp}-{algorithm}", *common])
    stages = 2
    if needs_judges(rl_cfg):
        stages = 3
        print("== 1/3 the judge (built once into run.cache_dir) ==")
        prebuild_judges(rl_cfg)  # here on every core, instead of inside a one-thread reward worker
    print(f"== {stages - 1}/{stages} SFT warm start ==")
    sft = RUNNERS["sft"]()(sft_cfg)
    rl_cfg.run.init_from = sft["final weights"]
    print(f"== {stages}/{stages} {algorithm.upper()} through Ray + vLLM ==")
    rl = RUNNERS[algorithm]()(rl_cfg)
    result = cls(rl_cfg).demo_report(sft, rl, (time.time() - start) / 60)
    result["fingerprints"] = asset_fingerprints(sft_cfg, rl_cfg)
    print("assets (the same fingerprints = the same build on another machine): "
          + ", ".join(f"{k} {v}" for k, v in result["fingerprints"].items()))
    print(f"runs: {sft['run']}  {rl['run']}")
    return result


def run_multi_demo(overrides: list[str], output_dir: str) -> dict:
    """`speechrl demo multi`: recipes/multi/demo.yaml, a short schedule on one backbone, and its matrix."""
    from speechrl.rlhf.core.schedule import load_schedule
    from speechrl.rlhf.trainers.schedule import run_schedule

    start = time.time()
    result = run_schedule(load_schedule("multi/demo", [f"schedule.output_dir={output_dir}", *overrides]))
    print(f"({(time.time() - start) / 60:.1f} min)")
    return result


def asset_fingerprints(sft_cfg, rl_cfg) -> dict[str, str]:
    """Fingerprints of what the demo built into run.cache_dir: the backbone it started from, the
    mode's data (Mode.data_fingerprints) and the embedded judges (each build also logs its own when it is made)."""
    from speechrl.rlhf.core.fingerprint import fingerprint
    from speechrl.rlhf.model.backbone import backbone_fingerprint
    from speechrl.rlhf.modes.base import get_mode
    from speechrl.rlhf.trainers.judges import judge_builds

    mode = get_mode(sft_cfg)
    prints = {"backbone": backbone_fingerprint(mode.backbone_path()), **mode.data_fingerprints()}
    for i, build in enumerate(judge_builds(rl_cfg)):
        weights = build() / "model.safetensors"  # already built: this only finds it
        if weights.is_file():
            prints["judge" if i == 0 else f"judge{i + 1}"] = fingerprint(weights)
    return prints
