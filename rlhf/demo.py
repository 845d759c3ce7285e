"""`speechrl demo`: the ASR story end to end on the embedded default.

1. build (once) a tiny random backbone and a synthetic spoken corpus,
2. SFT warm start (recipes/asr/sft.yaml, shortened),
3. GRPO from the SFT weights through Ray + vLLM (recipes/asr/grpo.yaml),
4. print held-out WER untrained -> after SFT -> after GRPO.
"""
from __future__ import annotations

import time

from speechrl.rlhf.config import load_recipe

# The demo's own settings, on top of the shipped recipes. SFT stops while the model still
# confuses words, so GRPO has errors left to remove within the demo's time budget.
SFT_OVERRIDES = ["train.steps=150", "train.eval_every=150", "train.checkpoint_every=150"]
GRPO_OVERRIDES: list[str] = []  # recipes/asr/grpo.yaml as shipped


def run_demo(overrides: list[str], output_dir: str = "runs") -> dict:
    from speechrl.rlhf.grpo import run_grpo
    from speechrl.rlhf.sft import run_sft

    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = [f"run.output_dir={output_dir}", *overrides]
    start = time.time()
    sft_cfg = load_recipe("asr/sft", [*SFT_OVERRIDES, f"run.name=demo-{stamp}-sft", *common])
    grpo_cfg = load_recipe("asr/grpo", [*GRPO_OVERRIDES, f"run.name=demo-{stamp}-grpo", *common])
    print("== 1/2 SFT warm start ==")
    sft = run_sft(sft_cfg)
    grpo_cfg.run.init_from = sft["final weights"]
    print("== 2/2 GRPO through Ray + vLLM ==")
    grpo = run_grpo(grpo_cfg)
    result = {"untrained": sft["held-out WER before"], "sft": sft["held-out WER after"],
              "grpo": grpo["held-out WER after"], "minutes": (time.time() - start) / 60}
    print(f"\nheld-out WER: untrained {result['untrained']:.3f} -> after SFT {result['sft']:.3f} "
          f"-> after GRPO {result['grpo']:.3f}   ({result['minutes']:.1f} min)")
    print(f"runs: {sft['run']}  {grpo['run']}")
    return result
