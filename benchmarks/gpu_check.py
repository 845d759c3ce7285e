"""The GPU check: a short ASR GRPO run on the machine's GPU(s), per layout, and the numbers a GPU user
looks at first: step time per phase, the policy's peak GPU memory, vLLM/trainer logprob agreement.

    python benchmarks/gpu_check.py                          # asr/grpo on the tiny backbone, both layouts
    python benchmarks/gpu_check.py --recipe asr/real_grpo --layouts separate --steps 5
    python benchmarks/gpu_check.py --layouts separate train.num_ranks=2   # two trainer ranks (FSDP2), 3 GPUs
    python benchmarks/gpu_check.py --allow-cpu --steps 2    # the script itself, on a CPU machine
    python benchmarks/gpu_check.py --transports transfer    # vLLM's weight transfer only

Each layout runs once per weight transport (--transports): `object_store` (Ray's object store) and
`transfer` (rollout.weight_transport=transfer: vLLM's weight-transfer engine for the layout, NCCL for
separate, CUDA IPC for colocated, gloo on CPU; rollouts/weight_transfer.py). The sync column compares them.

Needs a CUDA build of torch and vLLM (README, "On GPUs"). Each layout is a fresh run (its own Ray
cluster); `separate` needs 2 GPUs with one engine. Prints a markdown table; the runs' directories
stay under --output-dir for their curves and metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

PHASES = ("generate", "score", "advantages", "update", "sync", "log")


def run(recipe: str, layout: str, transport: str, steps: int, output_dir: str, overrides: list[str]) -> dict:
    import ray

    from speechrl.rlhf.core.config import load_recipe
    from speechrl.rlhf.trainers.online import run_online

    name = f"gpu-check-{layout}-{transport}"
    cfg = load_recipe(recipe, [f"train.steps={steps}", f"train.eval_every={steps}", "train.log_every=1",
                               f"ray.layout={layout}", f"rollout.weight_transport={transport}",
                               f"run.output_dir={output_dir}", f"run.name={name}", *overrides])
    run_online(cfg)
    if ray.is_initialized():
        ray.shutdown()
    rows = [json.loads(line) for line in (Path(output_dir) / name / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "time/step" in r]
    steps_rows = timed[1:] or timed  # the first step warms up (compiles, fills caches)

    def mean(key):
        values = [r[key] for r in steps_rows if key in r]
        return sum(values) / len(values) if values else float("nan")

    peak = max((r.get("perf/peak_gpu_gib", float("nan")) for r in rows), default=float("nan"))
    return {"layout": layout, "transport": transport, **{p: mean(f"time/{p}") for p in (*PHASES, "step")}, "peak GPU GiB (policy)": peak,
            "logprob gap": mean("train/logprob_gap")}


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="asr/grpo")
    p.add_argument("--layouts", nargs="+", default=["colocated", "separate"], choices=["colocated", "separate"])
    p.add_argument("--transports", nargs="+", default=["object_store", "transfer"],
                   choices=["object_store", "transfer"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--output-dir", default="runs/gpu-check")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (checks the script, not a GPU)")
    p.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = p.parse_args()
    gpus = torch.cuda.device_count()
    if not gpus and not args.allow_cpu:
        sys.exit("gpu_check: torch sees no GPU (torch.cuda.is_available() is False); install the CUDA builds "
                 "(README, 'On GPUs'), or pass --allow-cpu to run the script on CPU")
    device = torch.cuda.get_device_name(0) if gpus else f"CPU ({platform.processor() or platform.machine()})"
    results = []
    for layout in args.layouts:
        if layout == "separate" and 0 < gpus < 2:
            print(f"skipping layout separate: it needs 2 GPUs, this machine has {gpus}")
            continue
        for transport in args.transports:
            results.append(run(args.recipe, layout, transport, args.steps, args.output_dir, args.overrides))
    print(f"\n{args.recipe}, {args.steps} steps, on {device} x {gpus or 1}; seconds per step after the first\n")
    head = ["layout", "transport", *PHASES, "step", "peak GPU GiB (policy)", "logprob gap"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in results:
        print("| " + " | ".join(r[k] if isinstance(r[k], str) else f"{r[k]:.3g}" for k in head) + " |")


if __name__ == "__main__":
    main()
