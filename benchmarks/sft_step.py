"""SFT step time on a recipe, with the frozen audio tower's cache cold and warm, with and without
the projector's CTC loss (asr.ctc_weight).

A cold step encodes each of its clips with the tower (what every step cost before the cache, and
what the first epoch still costs); a warm step reads them from the cache (rlhf/model/tower_cache.py),
as every later epoch does. The same `--steps` batches are run cold, then again warm.

    python benchmarks/sft_step.py [--recipe asr/real_sft] [--steps 3] [overrides ...]

Builds what the recipe needs on first use (the small real backbone, SmolLM2's sentences and their
corpus: half an hour on 2 cores). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time


def timed_steps(recipe, steps: range) -> list[float]:
    out = []
    for step in steps:
        start = time.perf_counter()
        loss, _ = recipe.step_loss(step)
        recipe.optimizer.backward(loss)
        recipe.optimizer.step()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    from speechrl.rlhf.core.config import load_recipe
    from speechrl.rlhf.model.logprobs import audio_model
    from speechrl.rlhf.model.tower_cache import tower_cache
    from speechrl.rlhf.trainers.sft import SFTRecipe

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="asr/real_sft")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for ctc in ("0", "1.0"):
            cfg = load_recipe(args.recipe, [*args.overrides, f"asr.ctc_weight={ctc}", f"run.output_dir={out}",
                                            f"run.name=bench-{ctc}", "train.eval_every=0"])
            recipe = SFTRecipe(cfg)
            recipe.setup()
            cache = tower_cache(audio_model(recipe.model).audio_tower)
            cold = timed_steps(recipe, range(args.steps))
            misses = cache.misses
            warm = timed_steps(recipe, range(args.steps))
            rows.append((ctc, sum(cold) / len(cold), sum(warm) / len(warm), misses, cache.hits, cache.bytes))
            del recipe
    print(f"\n{args.recipe}, batch {cfg.train.batch_size}, {args.steps} steps each; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch threads {cfg.train.torch_threads or 'all'}\n")
    print("| asr.ctc_weight | cold step (s) | warm step (s) | speed-up | tower runs cold / warm | cache (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for ctc, cold, warm, misses, hits, size in rows:
        print(f"| {ctc} | {cold:.2f} | {warm:.2f} | {cold / warm:.2f}x | {misses} / 0 ({hits} hits) | {size / 2**20:.1f} |")
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
