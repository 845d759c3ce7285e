"""What several trainer ranks (train.num_ranks, FSDP2) cost and save: per rank, the weights, gradients
and AdamW moments it holds, its peak memory, and the time of a GRPO update, against one rank.

    python benchmarks/ranks.py                                   # the tiny backbone, 1 and 2 ranks
    python benchmarks/ranks.py --recipe asr/real_grpo --rows 16  # the small real backbone (172 M)

Each rank is a Ray actor (a CPU each here; a GPU each where Ray has them). The batch is GRPO-shaped:
`--rows` samples, `rollout.sampling.n` per clip of 2 s of noise, completions of 12 allowed tokens.
On a CPU machine the ranks share its cores, so the time column says little about GPUs; the memory
columns are what sharding is for. Every rank loads the whole backbone before sharding it, so the
peak RSS is one rank's (loading on rank 0 alone and broadcasting is not built). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import platform
import time


def _held(worker) -> dict:
    """On a rank (via Ray's __ray_call__): MiB of trainable weights, their optimizer state, RSS now and at peak."""
    import resource

    import psutil

    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    params = [p for g in worker.optimizer.optimizer.param_groups for p in g["params"]]
    weights = sum(local(p).numel() * local(p).element_size() for p in params)
    state = sum(local(v).numel() * local(v).element_size() for s in worker.optimizer.optimizer.state.values()
                for v in s.values() if hasattr(v, "numel") and v.dim() > 0)
    return {"weights": weights / 2**20, "optimizer": state / 2**20,
            "rss": psutil.Process().memory_info().rss / 2**20,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10}


def batch(cfg, backbone_path, allowed, rows, seed=0):
    import numpy as np

    from speechrl.rlhf.algos.batch import TrainBatch
    from speechrl.rlhf.model.backbone import load_processor
    from speechrl.rlhf.model.logprobs import prompt_ids_for
    from speechrl.rlhf.model.prompts import render_prompt

    rng = np.random.default_rng(seed)
    proc = load_processor(backbone_path)
    n = cfg.rollout.sampling.n
    prompts, completions, audios = [], [], []
    for _ in range(-(-rows // n)):
        clip = rng.normal(0, 0.1, 32000).astype(np.float32)
        ids = prompt_ids_for(proc, render_prompt(proc, "asr"), clip)
        for _ in range(n):
            prompts.append(ids)
            completions.append(rng.choice(allowed, 12).tolist())
            audios.append(clip)
    prompts, completions, audios = prompts[:rows], completions[:rows], audios[:rows]
    return TrainBatch(prompts, completions, audios, 1.0, sampling_logprobs=[[-1.0] * 12 for _ in prompts],
                      advantages=rng.normal(size=rows).tolist())


def main() -> None:
    import ray

    from speechrl.rlhf.core.config import load_recipe
    from speechrl.rlhf.modes import get_mode
    from speechrl.rlhf.workers.policy_group import PolicyClient, make_policy_workers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="asr/grpo")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed updates (after one warm-up)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_recipe(args.recipe, ["train.warmup_steps=0", "rl.kl_coef=0", *args.overrides])
    mode = get_mode(cfg)
    backbone = str(mode.backbone_path())
    from speechrl.rlhf.model.backbone import load_processor

    allowed = mode.setup_task(load_processor(backbone)).allowed_ids
    train = batch(cfg, backbone, allowed, args.rows)
    table = []
    for ranks in args.ranks:
        ray.init(address="local", num_cpus=max(ranks, 2), include_dashboard=False, logging_level="ERROR")
        try:
            client = PolicyClient(make_policy_workers(cfg, backbone, allowed_ids=allowed,
                                                      options=[{"num_cpus": 1}] * ranks))
            client.train(train)  # warm-up: first-touch allocations, the tower cache
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                client.train(train)
                times.append(time.perf_counter() - start)
            held = ray.get([a.__ray_call__.remote(_held) for a in client.actors])
        finally:
            ray.shutdown()
        table.append((ranks, sorted(times)[len(times) // 2], held))
    print(f"\n{args.recipe} ({args.rows} rows, micro-batch {cfg.train.batch_size}), {platform.processor() or platform.machine()}, "
          "Ray actors of one CPU each\n")
    print("| ranks | update s (median) | trainable weights MiB / rank | AdamW state MiB / rank | RSS after MiB / rank "
          "| peak RSS MiB / rank |")
    print("|---|---|---|---|---|---|")
    for ranks, t, held in table:
        print(f"| {ranks} | {t:.2f} | {held[0]['weights']:.0f} | {held[0]['optimizer']:.0f} | "
              f"{max(h['rss'] for h in held):.0f} | {max(h['peak_rss'] for h in held):.0f} |")


if __name__ == "__main__":
    main()
