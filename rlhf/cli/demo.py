"""`speechrl demo [asr|tts|realtime]`: a mode's story end to end on the embedded default.

1. build (once) what the mode runs on: a tiny random backbone, a synthetic spoken corpus (ASR,
   TTS) or persona dialogues (realtime), the codec, and the embedded judges its rewards read,
2. SFT warm start (recipes/<mode>/sft.yaml, with the mode's demo settings),
3. the mode's RL algorithm through Ray + vLLM from the SFT weights (GRPO for ASR and TTS, PPO with
   a critic for realtime; recipes/<mode>/<algorithm>.yaml as shipped),
4. the mode's before/after report: held-out WER (ASR), intelligibility and the other components
   with where the wav samples are (TTS), judge score and out-of-character rate by turn (realtime;
   its tiny judge is random, so those scores exercise the machinery and mean nothing).
"""
from __future__ import annotations

import time

from speechrl.rlhf.core.config import load_recipe
from speechrl.rlhf.core.registry import MODES


def run_demo(overrides: list[str], output_dir: str = "runs", mode: str = "asr") -> dict:
    from speechrl.rlhf.cli.main import RUNNERS
    from speechrl.rlhf.core.checks import registered_modes
    from speechrl.rlhf.trainers.judges import needs_judges, prebuild_judges

    if mode not in registered_modes():
        raise ValueError(f"demo: no demo for mode {mode!r}; choose one of {', '.join(MODES.names())}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = [f"run.output_dir={output_dir}", *overrides]
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
    print(f"runs: {sft['run']}  {rl['run']}")
    return result
