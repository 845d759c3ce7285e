"""`speechrl demo [asr|tts]`: a mode's story end to end on the embedded default.

ASR (the default):
1. build (once) a tiny random backbone and a synthetic spoken corpus,
2. SFT warm start (recipes/asr/sft.yaml, shortened),
3. GRPO from the SFT weights through Ray + vLLM (recipes/asr/grpo.yaml),
4. print held-out WER untrained -> after SFT -> after GRPO.

TTS (`speechrl demo tts`):
1. build (once) the backbone, a one-voice corpus, the embedded codec and the judge ASR,
2. SFT warm start on the corpus' codec tokens (recipes/tts/sft.yaml),
3. GRPO on the combined speech rewards through Ray + vLLM (recipes/tts/grpo.yaml),
4. print held-out intelligibility (the judge's CER) and the other components before and after,
   and where the wav samples of every evaluation are.

Realtime (`speechrl demo realtime`):
1. build (once) a tiny backbone whose tokenizer knows the persona cards, the codec, the user turns'
   speech and the synthetic reference replies' speech, and the tiny judge,
2. SFT warm start on the builtin dialogues' reference replies (recipes/realtime/sft.yaml),
3. PPO with a critic through Ray + vLLM (recipes/realtime/ppo.yaml), drift evaluated before and after,
4. print the judge score and out-of-character rate by turn, before and after, and the drift plot.
   The tiny judge is random: its scores exercise the machinery and mean nothing.
"""
from __future__ import annotations

import time

from speechrl.rlhf.core.config import load_recipe

# The demo's own settings, on top of the shipped recipes. SFT stops while the model still
# confuses words, so GRPO has errors left to remove within the demo's time budget.
SFT_OVERRIDES = {"asr": ["train.steps=150", "train.eval_every=150", "train.checkpoint_every=150"],
                 "tts": [], "realtime": []}
RL_ALGORITHM = {"asr": "grpo", "tts": "grpo", "realtime": "ppo"}  # each mode's default algorithm (DESIGN.md)
RL_OVERRIDES: dict[str, list[str]] = {"asr": [], "tts": [], "realtime": []}  # the shipped recipes as they are
HEADLINE = {"asr": ("held-out WER", "{:.3f}"), "tts": ("held-out intelligibility CER", "{:.3f}")}


def run_demo(overrides: list[str], output_dir: str = "runs", mode: str = "asr") -> dict:
    from speechrl.rlhf.cli.main import RUNNERS
    from speechrl.rlhf.trainers.judges import prebuild_judges

    if mode not in SFT_OVERRIDES:
        raise ValueError(f"demo: no demo for mode {mode!r}; choose one of {', '.join(SFT_OVERRIDES)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = [f"run.output_dir={output_dir}", *overrides]
    start = time.time()
    algorithm = RL_ALGORITHM[mode]
    sft_cfg = load_recipe(f"{mode}/sft", [*SFT_OVERRIDES[mode], f"run.name={mode}-demo-{stamp}-sft", *common])
    rl_cfg = load_recipe(f"{mode}/{algorithm}", [*RL_OVERRIDES[mode], f"run.name={mode}-demo-{stamp}-{algorithm}",
                                                 *common])
    stages = 2
    if mode in ("tts", "realtime"):
        stages = 3
        print("== 1/3 the judge (built once into run.cache_dir) ==")
        prebuild_judges(rl_cfg)  # here on every core, instead of inside a one-thread reward worker
    print(f"== {stages - 1}/{stages} SFT warm start ==")
    sft = RUNNERS["sft"]()(sft_cfg)
    rl_cfg.run.init_from = sft["final weights"]
    print(f"== {stages}/{stages} {algorithm.upper()} through Ray + vLLM ==")
    rl = RUNNERS[algorithm]()(rl_cfg)
    if mode == "realtime":
        return _realtime_report(sft, rl, start)
    label, fmt = HEADLINE[mode]
    result = {"untrained": sft[f"{label} before"], "sft": sft[f"{label} after"], "grpo": rl[f"{label} after"],
              "minutes": (time.time() - start) / 60}
    print(f"\n{label}: untrained {fmt.format(result['untrained'])} -> after SFT {fmt.format(result['sft'])} "
          f"-> after GRPO {fmt.format(result['grpo'])}   ({result['minutes']:.1f} min)")
    if mode == "tts":
        print(_tts_table(sft, rl))
        print(f"listen: {sft['run']}/samples/step-*/  and  {rl['run']}/samples/step-*/ "
              "(reference/ holds the corpus recordings and their codec round trip)")
    print(f"runs: {sft['run']}  {rl['run']}")
    return result


def _realtime_report(sft: dict, rl: dict, start: float) -> dict:
    """The drift curves of the RL run's first (before: the SFT weights) and last evaluations."""
    import json
    from pathlib import Path

    runs = sorted((Path(rl["run"]) / "drift").glob("step-*.json"))
    before, after = (json.loads(p.read_text()) for p in (runs[0], runs[-1]))
    lines = [f"{'turn':>4}  {'judge before':>12}  {'judge after':>11}  {'OOC before':>10}  {'OOC after':>9}"]
    for k, turn in enumerate(before["turn"]):
        lines.append(f"{turn:>4}  {before['judge'][k]:>12.3f}  {after['judge'][k]:>11.3f}  "
                     f"{before['ooc'][k]:>10.2f}  {after['ooc'][k]:>9.2f}")
    result = {"sft heldout loss": sft.get("held-out reply loss after", float("nan")),
              "judge before": rl.get("drift judge score before"), "judge after": rl.get("drift judge score after"),
              "ooc before": rl.get("drift out-of-character rate before"),
              "ooc after": rl.get("drift out-of-character rate after"), "minutes": (time.time() - start) / 60}
    print(f"\ndrift over {len(before['turn'])} turns (judge score in [0, 1]; out of character: score < "
          f"{before['threshold']:g}), before (step {before['step']}) and after (step {after['step']}) PPO:")
    print("\n".join(lines))
    print(f"all turns: judge {result['judge before']:.3f} -> {result['judge after']:.3f}, out-of-character rate "
          f"{result['ooc before']:.2f} -> {result['ooc after']:.2f}   ({result['minutes']:.1f} min)")
    print("The embedded judge is a tiny random LM: these scores exercise the machinery and carry no meaning.")
    print(f"plot: {rl['drift plot']}\nruns: {sft['run']}  {rl['run']}")
    return result


def _tts_table(sft: dict, grpo: dict) -> str:
    """Every headline component: untrained, after SFT, after GRPO."""
    labels = [k[: -len(" before")] for k in sft if k.endswith(" before")]
    width = max(len(label) for label in labels)
    lines = [f"{'':<{width}}  {'untrained':>9}  {'SFT':>9}  {'GRPO':>9}"]
    for label in labels:
        values = (sft[f"{label} before"], sft[f"{label} after"], grpo.get(f"{label} after", float("nan")))
        lines.append(f"{label:<{width}}  " + "  ".join(f"{v:>9.3f}" for v in values))
    return "\n".join(lines)
