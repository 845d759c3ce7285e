"""How long a weight sync takes, per transport: Ray's object store against vLLM's weight transfer.

    python benchmarks/weight_sync.py                              # the tiny backbone, 2 engines
    python benchmarks/weight_sync.py --recipe asr/real_grpo --engines 1   # the small real backbone (172 M)

The policy worker and the engines are Ray actors, as in a run; each sync sends the policy's full
weights and waits until every engine has loaded them. `object_store`: the policy puts them in the
store, each engine reads and reloads them (rollouts/sync.py). `gloo` (on CPU) or `nccl` (engines on
GPUs of their own): the policy broadcasts them through vLLM's weight-transfer engines
(rollouts/weight_transfer.py); the first sync also forms the group and is timed apart. Prints a
markdown table: seconds per sync (median of --repeats after a warm-up), and the bytes sent.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time


def main() -> None:
    import ray
    import torch

    from speechrl.rlhf.core.config import load_recipe
    from speechrl.rlhf.modes import get_mode
    from speechrl.rlhf.workers.policy_group import PolicyClient, make_policy_workers
    from speechrl.rollouts.engine import make_rollout_workers
    from speechrl.rollouts.sync import TRANSPORTS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="asr/grpo")
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--transports", nargs="+", default=None, help="default: object_store and gloo (nccl on GPUs)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    transports = args.transports or ["object_store", "nccl" if gpu else "gloo"]
    cfg = load_recipe(args.recipe, [f"rollout.num_workers={args.engines}", "rollout.threads_per_worker=1",
                                    *args.overrides])
    backbone = str(get_mode(cfg).backbone_path())
    ray.init(address="local", num_cpus=max(2, args.engines + 1), num_gpus=torch.cuda.device_count(),
             include_dashboard=False, log_to_driver=False)
    policy = PolicyClient(make_policy_workers(cfg, backbone, allowed_ids=list(range(16))))
    weights = policy.weights()
    size = sum(t.numel() * t.element_size() for _, t in weights) / 2**20
    rows = []
    for name in transports:
        rollout = dataclasses.replace(cfg.rollout, weight_transport=name)
        transport = TRANSPORTS.get(name)(rollout)
        engines = make_rollout_workers(backbone, rollout, args.engines, seed=0,
                                       weight_transfer=transport.backend if transport.direct else None)

        def sync():
            start = time.perf_counter()
            if transport.direct:
                transport.sync(policy, engines)
            else:
                transport.send(policy.stored_weights(), engines)
            return time.perf_counter() - start

        first = sync()
        times = [sync() for _ in range(args.repeats)]
        rows.append((name, first, statistics.median(times), min(times), max(times)))
        for e in engines:
            ray.kill(e)
    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.processor() or platform.machine()})"
    print(f"\n{args.recipe}: {len(weights)} tensors, {size:.1f} MiB, to {args.engines} engine(s), on {device}\n")
    print("| transport | first sync s | sync s (median) | min | max |\n|---|---|---|---|---|")
    for name, first, median, low, high in rows:
        print(f"| {name} | {first:.2f} | {median:.2f} | {low:.2f} | {high:.2f} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
