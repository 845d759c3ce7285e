"""ASR rollout throughput: our Ray rollout workers (vLLM) vs transformers `generate`, same backbone,
same audio prompts, same sampling; then the per-phase time split of GRPO steps.

    python benchmarks/rollout_throughput.py [--prompts 16] [--n 8] [--tokens 32] [--grpo-steps 6]

Prints markdown tables (pasted into the README with the machine they ran on).
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from grpo_step import grpo_phase_split  # benchmarks/ is the script's folder


def three_second_prompts(count: int, sample_rate: int) -> list[np.ndarray]:
    from speechrl.data.synth import command_sentences, synthesize

    clips = []
    for i, text in enumerate(command_sentences(count * 2, seed=7)[:count]):
        audio = synthesize(f"{text} and then {text}", rate=140, sample_rate=sample_rate)
        clip = np.zeros(3 * sample_rate, dtype=np.float32)  # exactly 3 s: trimmed or zero-padded
        clip[: min(len(audio), len(clip))] = audio[: len(clip)]
        clips.append(clip)
    return clips


def text_ids_without_eos(tokenizer) -> list[int]:
    """ASR's decoding constraint minus end-of-turn: every sample is exactly `tokens` long on both paths."""
    from speechrl.rlhf.model.backbone import IM_END, text_token_ids

    eos = tokenizer.convert_tokens_to_ids(IM_END)
    return [i for i in text_token_ids(tokenizer) if i != eos]


def bench_transformers(path, clips, n, tokens, temperature, repeats: int) -> dict:
    from speechrl.rlhf.model.prompts import render_prompt
    from speechrl.rlhf.model.backbone import load_backbone

    bb = load_backbone(path)
    proc, tok = bb.processor, bb.tokenizer
    tok.padding_side = "left"
    prompt = render_prompt(proc, "asr")

    def features():  # inside the timed region: the rollout workers also start from raw audio
        return proc(text=[prompt] * len(clips), audio=clips, sampling_rate=bb.sample_rate, padding=True,
                    return_tensors="pt")

    inputs = features()
    allowed = set(text_ids_without_eos(tok))
    vocab = bb.model.get_output_embeddings().weight.shape[0]
    kw = dict(do_sample=True, temperature=temperature, num_return_sequences=n, max_new_tokens=tokens,
              pad_token_id=tok.pad_token_id, suppress_tokens=[i for i in range(vocab) if i not in allowed])
    with torch.no_grad():
        bb.model.generate(**inputs, **kw)  # warm-up: the same workload once, untimed
        start = time.perf_counter()
        for _ in range(repeats):
            out = bb.model.generate(**features(), **kw)
        seconds = (time.perf_counter() - start) / repeats
    generated = out[:, inputs["input_ids"].shape[1]:].numel()
    return {"samples": out.shape[0], "tokens": generated, "seconds": seconds}


def bench_rollout_workers(path, clips, n, tokens, temperature, rollout_cfg, repeats: int) -> dict:
    import ray

    from speechrl.rlhf.model.prompts import render_prompt
    from speechrl.rlhf.model.backbone import load_backbone
    from speechrl.rollouts.engine import generate_across, make_rollout_workers
    from speechrl.rollouts.types import RolloutRequest

    proc = load_backbone(path).processor
    prompt = render_prompt(proc, "asr")
    allowed = text_ids_without_eos(proc.tokenizer)
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, rollout_cfg.num_workers), include_dashboard=False,
             log_to_driver=False)
    try:
        start = time.perf_counter()
        handles = make_rollout_workers(str(path), rollout_cfg, rollout_cfg.num_workers, seed=0)
        startup = time.perf_counter() - start
        reqs = [RolloutRequest(prompt, c, 16000, {}) for c in clips]
        sampling = dict(n=n, temperature=temperature, top_p=1.0, max_new_tokens=tokens, allowed_token_ids=allowed)
        generate_across(handles, reqs, **sampling)  # warm-up: the same workload once, untimed
        seconds = 0.0
        for _ in range(repeats):
            # every timed run starts cold, as a GRPO step's new prompts do: no cached prompt or audio
            ray.get([h.reset_caches.remote() for h in handles])
            start = time.perf_counter()
            samples = generate_across(handles, reqs, **sampling)
            seconds += (time.perf_counter() - start) / repeats
    finally:
        ray.shutdown()
    return {"samples": len(samples), "tokens": sum(len(s.completion_ids) for s in samples),
            "seconds": seconds, "startup": startup}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", help="backbone dir (default: the embedded tiny backbone)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--workers", type=int, help="rollout workers (default: recipes/asr/grpo.yaml's)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per path (after one untimed warm-up)")
    ap.add_argument("--grpo-steps", type=int, default=6, help="0 skips the GRPO phase split")
    args = ap.parse_args()

    from speechrl.rlhf.modes import assets
    from speechrl.rlhf.core.config import load_recipe

    recipe = load_recipe("asr/grpo", [f"rollout.num_workers={args.workers}"] if args.workers else [])
    path = Path(args.backbone) if args.backbone else assets.backbone_path(recipe)
    clips = three_second_prompts(args.prompts, 16000)
    hf = bench_transformers(path, clips, args.n, args.tokens, args.temperature, args.repeats)
    ours = bench_rollout_workers(path, clips, args.n, args.tokens, args.temperature, recipe.rollout, args.repeats)

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"workload: {args.prompts} prompts x {args.n} samples x {args.tokens} new tokens, 3 s audio each, "
          f"temperature {args.temperature}; mean of {args.repeats} runs after a warm-up\n")
    print("| path | samples/s | tokens/s | seconds | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for name, r in (("transformers generate", hf), (f"speechrl rollout workers ({recipe.rollout.num_workers}x vLLM)", ours)):
        speedup = (r["tokens"] / r["seconds"]) / (hf["tokens"] / hf["seconds"])
        print(f"| {name} | {r['samples'] / r['seconds']:.1f} | {r['tokens'] / r['seconds']:.0f} | "
              f"{r['seconds']:.2f} | {speedup:.2f}x |")
    print(f"\n(rollout worker start-up, once per run: {ours['startup']:.1f} s)")

    if args.grpo_steps:
        with tempfile.TemporaryDirectory() as tmp:
            split = grpo_phase_split(path, args.grpo_steps, Path(tmp))
            split = {k: v for k, v in split.items() if k.startswith("time/")}
        step = split.pop("time/step")
        split.pop("time/checkpoint", None)
        print(f"\nGRPO step, mean of steps 2..{args.grpo_steps - 1} (recipes/asr/grpo.yaml): {step:.2f} s")
        print("| phase | seconds | share |")
        print("|---|---:|---:|")
        for k, v in split.items():
            print(f"| {k[5:]} | {v:.3f} | {100 * v / step:.1f} % |")
        outside = step - sum(split.get(f"time/{p}", 0.0) for p in ("generate", "score", "update"))
        print(f"| **outside generate/score/update** | {outside:.3f} | {100 * outside / step:.1f} % |")


if __name__ == "__main__":
    main()
