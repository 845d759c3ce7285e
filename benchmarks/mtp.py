"""Verified multi-token decoding (MTP) on the ASR held-out set: accepted length, speed, WER.

For each checkpoint (a backbone directory whose `mtp/` holds heads, e.g. an asr/sft run's `final`)
and each k, one vLLM rollout engine (rollouts/engine.py) decodes every held-out clip greedily, with
the first k heads drafting (k = 0: plain decoding), as one batch and one clip at a time. Prints a
markdown table: tokens emitted per decoding step (mean and histogram), drafts kept per position,
wall time and speed-up over k = 0, held-out WER, and whether the output is k = 0's token for token.

    python benchmarks/mtp.py --checkpoint sft=runs/sft/final [--checkpoint grpo=runs/grpo/final] \\
        [--ks 1,3,5,7] [--repeats 3] [--recipe asr/sft] [override ...]

The overrides go to the recipe that names the held-out set (the corpus of the run that trained
the checkpoint). Greedy only: on CPU vLLM 0.32's speculative sampling is not the policy's (docs/mtp.md).
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import time

import numpy as np


def heldout(recipe: str, overrides: list[str]):
    """(clips, reference texts, eval_max_new_tokens) of the recipe's held-out set."""
    from speechrl.rlhf.core.config import load_recipe
    from speechrl.rlhf.modes import get_mode
    from speechrl.rlhf.modes.base import first

    cfg = load_recipe(recipe, overrides)
    mode = get_mode(cfg)
    _, eval_set = mode.datasets(cfg.model.tiny.max_audio_seconds)
    items = first(eval_set, cfg.data.max_eval_examples)
    return [a for _, a in items], [ex.text for ex, _ in items], cfg.eval_max_new_tokens


def decode(path: str, k: int, clips, max_new_tokens: int, repeats: int, threads: int) -> dict:
    """Greedy decoding of every clip with k drafting heads: ids, timings and acceptance."""
    from speechrl.rlhf.model.backbone import load_backbone, text_token_ids
    from speechrl.rlhf.model.mtp import acceptance
    from speechrl.rlhf.model.prompts import render_prompt
    from speechrl.rollouts.engine import RolloutEngine
    from speechrl.rollouts.types import RolloutRequest

    bb = load_backbone(path)
    prompt = render_prompt(bb.processor, "asr")
    allowed = text_token_ids(bb.tokenizer)
    requests = [RolloutRequest(prompt=prompt, audio=c, sample_rate=bb.sample_rate) for c in clips]
    engine = RolloutEngine(path, kv_cache_gib=0.5, max_model_len=1024, threads=threads, mtp_tokens=k)

    def run(batch):
        return [s.completion_ids for s in engine.generate(batch, n=1, temperature=0.0, top_p=1.0,
                                                          max_new_tokens=max_new_tokens, allowed_token_ids=allowed)]

    run(requests[:4])  # warm-up
    before = engine.spec_stats() if k else None
    batched, single = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        ids = run(requests)
        batched.append(time.perf_counter() - start)
        start = time.perf_counter()
        one_by_one = [run([r])[0] for r in requests]
        single.append(time.perf_counter() - start)
    assert one_by_one == ids, "greedy decoding depends on the batch"
    stats = None
    if k:
        after = engine.spec_stats()
        stats = acceptance(after["drafts"] - before["drafts"],
                           [a - b for a, b in zip(after["accepted_per_position"], before["accepted_per_position"])])
    texts = bb.tokenizer.batch_decode(ids, skip_special_tokens=True)
    del engine
    gc.collect()
    return {"ids": ids, "texts": texts, "batched_s": float(np.median(batched)), "single_s": float(np.median(single)),
            "tokens": sum(len(i) for i in ids), "acceptance": stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, help="label=backbone dir with mtp/ heads")
    parser.add_argument("--ks", default="1,3,5,7", help="drafting heads to compare with plain decoding")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the held-out set (median)")
    parser.add_argument("--recipe", default="asr/sft", help="recipe whose held-out set is decoded")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from speechrl.rewards.asr import word_error_rate
    from speechrl.rlhf.model.mtp import saved_heads

    clips, refs, max_new = heldout(args.recipe, args.overrides)
    ks = [int(k) for k in args.ks.split(",")]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {len(clips)} held-out "
          f"clips, greedy, <= {max_new} tokens, median of {args.repeats}\n")
    print("| checkpoint | k | tokens / step (mean) | kept drafts 0..k (share of steps) | kept at position 1..k |"
          " batch of all: s (speed-up) | one clip at a time: s (speed-up) | WER | = plain output |")
    print("|---|---:|---:|---|---|---:|---:|---:|:-:|")
    for spec in args.checkpoint:
        label, path = spec.split("=", 1)
        plain = decode(path, 0, clips, max_new, args.repeats, args.threads)
        wer = float(np.mean([word_error_rate(h, r) for h, r in zip(plain["texts"], refs)]))
        print(f"| {label} | 0 | 1 | | | {plain['batched_s']:.2f} | {plain['single_s']:.2f} | {wer:.3f} | |", flush=True)
        for k in ks:
            if k > (saved := saved_heads(path)):
                print(f"| {label} | {k} | (skipped: the checkpoint has {saved} heads) | | | | | | |", flush=True)
                continue
            out = decode(path, k, clips, max_new, args.repeats, args.threads)
            acc = out["acceptance"]
            wer = float(np.mean([word_error_rate(h, r) for h, r in zip(out["texts"], refs)]))
            hist = " ".join(f"{h:.2f}" for h in acc["histogram"])
            print(f"| {label} | {k} | {acc['mean_emitted']:.2f} | {hist} | {' '.join(f'{x:.2f}' for x in acc['kept'])} | "
                  f"{out['batched_s']:.2f} ({plain['batched_s'] / out['batched_s']:.2f}x) | "
                  f"{out['single_s']:.2f} ({plain['single_s'] / out['single_s']:.2f}x) | {wer:.3f} | "
                  f"{'yes' if out['ids'] == plain['ids'] else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
