"""Where the trainer's models run and in which precision: one code path for CUDA and CPU.

`train.device: auto` puts the policy, reference, critic and in-process evaluation on the GPU Ray
gave the actor (CUDA_VISIBLE_DEVICES), or on CPU when there is none. `train.dtype: bf16` runs the
forward passes under torch.autocast while the weights, their gradients and AdamW's moments stay
fp32 (the master weights the optimizer needs); `auto` is bf16 where the hardware computes it
natively: a GPU that has it, or a CPU with a bf16 dot product (AVX512-BF16, AMX) in a process that
opted in to the CPU's own kernels (core/kernels.py: `run.cpu_kernels: native` gives them to an online
run's actors, SPEECHRL_CPU_KERNELS=native to every process); fp32 elsewhere, so the CLI's driver, the
test suite and a library user who never opted in stay fp32 on CPU. fp16 is not offered: it needs a
loss scaler, and every GPU this targets has bf16.
"""
from __future__ import annotations

import contextlib

import torch

from speechrl.rlhf.core.kernels import native_bf16

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def train_device(name: str = "auto") -> torch.device:
    """The device `train.device` names; "cuda" without a visible GPU is an error naming the fix."""
    if name not in DEVICES:
        raise ValueError(f"train.device={name!r}: expected one of {', '.join(DEVICES)}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but torch sees no GPU here (torch.cuda.is_available() is False): "
                           "install a CUDA build of torch, give the actor a GPU (a cluster with GPU nodes), "
                           "or set train.device=auto")
    return torch.device("cuda", torch.cuda.current_device())


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The forward passes' precision for `train.dtype` on `device`."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if device.type == "cpu" and native_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"train.dtype={name!r}: expected auto, {' or '.join(DTYPES)}")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """A context for the forward passes: nothing for fp32, torch.autocast otherwise."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def peak_rss_mib() -> int:
    """This process's peak resident memory so far (the summaries' "peak RSS (MiB)")."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """`perf/peak_gpu_gib` since the last call (and reset) on a GPU; nothing on CPU."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return {"perf/peak_gpu_gib": peak}


def release_memory(device: torch.device) -> None:
    """Collect what a dropped engine or model left, so that the next one finds the GPU's memory free."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
