"""Seconds per GRPO step of `recipes/asr/grpo.yaml`, phase by phase, for one or more settings.

    python benchmarks/grpo_step.py [--steps 6] [--set "rollout.async.enabled=true" ...] [--json out.json]

Each `--set` is one configuration (space-separated recipe overrides; "" = the recipe as shipped), run
one after the other from the same starting weights (default: the untrained embedded backbone, so every
completion runs to the 32-token cap). Step 1 carries vLLM's first-call warm-up and the last step the
final evaluation, so the mean is over steps 2 .. steps-1. Async runs also report their batches'
staleness and the producer's own generate/score seconds, which overlap the update. Each run's start-up
(Ray, the placement, the policy workers, reward worker and engines until all answer) is a column too.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import tempfile
from pathlib import Path

import numpy as np


def grpo_phase_split(path, steps: int, workdir: Path, overrides: list[str] = (), name: str = "bench") -> dict:
    """Mean per-step seconds (time/*) and async statistics (async/*) of a short asr/grpo run."""
    from speechrl.rlhf.core.config import load_recipe
    from speechrl.rlhf.trainers.online import run_online

    cfg = load_recipe("asr/grpo", [f"run.init_from={path}", f"train.steps={steps}", f"run.output_dir={workdir}",
                                   f"run.name={name}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
                                   "data.max_eval_examples=8", *overrides])
    summary = run_online(cfg)
    rows = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step" in r][1:-1]  # not step 1 (warm-up) nor the last (evaluation)
    keys = sorted({k for r in rows for k in r if k.startswith(("time/", "async/"))})
    out = {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}
    if "async/staleness" in out:
        out["async/staleness_max"] = float(max(r["async/staleness"] for r in rows))
    out["startup"] = summary["start-up time (s)"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", help="starting weights (default: the embedded tiny backbone, untrained)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--set", action="append", dest="settings", help="one configuration's overrides (repeatable)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.steps < 3:
        ap.error("--steps must be >= 3: step 1 warms vLLM up and the last step evaluates; neither is timed")

    from speechrl.rlhf.core.kernels import pin_cpu_kernels

    pin_cpu_kernels()  # as `speechrl train` does
    import torch

    from speechrl.rlhf.core.config import load_recipe
    from speechrl.rlhf.modes import assets

    path = Path(args.backbone) if args.backbone else assets.backbone_path(load_recipe("asr/grpo"))
    settings = args.settings or [""]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, setting in enumerate(settings):
            results[setting or "(as shipped)"] = grpo_phase_split(path, args.steps, Path(tmp), shlex.split(setting),
                                                                  name=f"run{k}")
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; recipes/asr/grpo.yaml, "
          f"mean of steps 2..{args.steps - 1}\n")
    phases = ["wait", "generate", "score", "advantages", "update", "sync", "log"]
    print("| setting | step s | " + " | ".join(phases) + " | staleness mean/max | producer generate+score s | start-up s |")
    print("|---|---:|" + "---:|" * len(phases) + "---:|---:|---:|")
    base = None
    for name, r in results.items():
        base = base or r["time/step"]
        cells = [f"{r[f'time/{p}']:.2f}" if f"time/{p}" in r else "" for p in phases]
        stale = f"{r['async/staleness']:.2f} / {r['async/staleness_max']:.0f}" if "async/staleness" in r else ""
        producer = (f"{r.get('async/generate_s', 0) + r.get('async/score_s', 0):.2f}" if "async/generate_s" in r else "")
        print(f"| {name} | {r['time/step']:.2f} ({r['time/step'] / base:.2f}x) | " + " | ".join(cells) +
              f" | {stale} | {producer} | {r['startup']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
