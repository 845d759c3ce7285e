"""The same floats on every x86-64 CPU: the CPU kernels' code path pinned to AVX2.

torch's own vectorized kernels (ATen), MKL and oneDNN each pick a code path by CPU when they first
run, and AVX-512 and AVX2 paths round differently. A build of 1200 training steps amplifies those
last bits: the TTS judge, same corpus, seed and code, came out with held-out CER 0.389 on one machine
and 0.621 on an AVX2-only one. With the three variables below set to AVX2 before torch computes
anything, an AVX-512 machine built the AVX2-only machine's judge byte for byte (weights fingerprint
1267834576df, docs/results.md). vLLM's CPU kernels are compiled per instruction set and are not
covered: rollouts sampled on vLLM may still differ between CPUs.

The CLI pins at start (and the test suite, in tests/conftest.py); a library user calls
`pin_cpu_kernels()` before torch runs anything, or sets the variables. SPEECHRL_CPU_KERNELS=native
keeps each CPU's own fastest paths.

An online run can unpin the Ray actors that train and generate while the driver, which builds the
assets, stays pinned: `run.cpu_kernels: native` (`actor_env`). Only the CPU's own kernels compute
bf16 at speed where the CPU has bf16 dot products (AVX512-BF16, AMX): `train.dtype`/`rollout.dtype`
`auto` are bf16 there (`native_bf16`), and in any process started with SPEECHRL_CPU_KERNELS=native.
AVX2 has none; bf16 on the pinned path is emulated, about ten times slower than fp32
(docs/results.md, "Asynchronous rollouts and a faster update").
"""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
CPU_KERNELS = ("pinned", "native")  # run.cpu_kernels
BF16_DOT_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of a native bf16 dot product
# what torch's ATen needs for its AVX-512 code path (cpuinfo's check); else its AVX2 path
ATEN_AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


@functools.cache  # a CPU's flags do not change; read once per process
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def has_avx2() -> bool:
    """Whether this is an x86-64 CPU with AVX2 (Linux: /proc/cpuinfo's flags)."""
    return _x86() and "avx2" in cpu_flags()


def kernels_override() -> str:
    """SPEECHRL_CPU_KERNELS as "native", "pinned" ("avx2" too) or "" (unset: the CLI pins its process,
    a run's actors follow run.cpu_kernels); any other value is an error naming the choices."""
    value = os.environ.get("SPEECHRL_CPU_KERNELS", "").strip().lower()
    if value in ("", "native", "pinned"):
        return value
    if value == "avx2":
        return "pinned"
    raise ValueError(f"SPEECHRL_CPU_KERNELS={os.environ['SPEECHRL_CPU_KERNELS']!r}: expected native (the CPU's own "
                     "kernels everywhere), avx2 or pinned (every process and run actor pinned), or unset")


def pin_cpu_kernels() -> dict[str, str]:
    """Set the variables that pin torch, MKL and oneDNN to their AVX2 paths, where not set already,
    on an x86-64 CPU with AVX2; child processes (Ray's workers) inherit them. Returns what it set.
    It must run before torch's first computation in this process: later, the paths are chosen."""
    if kernels_override() == "native" or not has_avx2():
        return {}
    added = {k: v for k, v in PINNED.items() if k not in os.environ}
    os.environ.update(added)
    return added


def pinned_env() -> dict[str, str]:
    """The pinning variables as this process has them: what a remote Ray cluster's workers need too."""
    return {k: os.environ[k] for k in PINNED if k in os.environ}


def native_env(flags: set[str] | None = None, aten: bool = True) -> dict[str, str]:
    """The variables that give a child process the CPU's own kernels although its parent's environment
    pins them (a Ray actor's runtime_env overrides what it inherits): MKL's and oneDNN's defaults, which
    pick their paths by the CPU they run on (oneDNN's carry the bf16 matrix products), and
    SPEECHRL_CPU_KERNELS=native, the opt-in that lets `auto` precision choose bf16 (`native_bf16`).
    `aten`: also ATen's best path for `flags` (default: this CPU's), for a child on this machine only:
    ATen takes "avx512" without checking the CPU, so on another node it could not run; there ATen
    keeps the AVX2 pin, which costs the element-wise ops a little and the matrix products nothing.
    Empty off x86-64 and where the flags cannot be read: nothing is pinned there."""
    flags = cpu_flags() if flags is None else flags
    if not _x86() or not flags:
        return {}
    env = {"MKL_CBWR": "AUTO", "ONEDNN_MAX_CPU_ISA": "ALL", "SPEECHRL_CPU_KERNELS": "native"}
    if aten:
        env["ATEN_CPU_CAPABILITY"] = ("avx512" if all(f in flags for f in ATEN_AVX512_FLAGS)
                                      else "avx2" if "avx2" in flags else "default")
    return env


def actor_env(cpu_kernels: str, one_node: bool = True) -> dict[str, str]:
    """Environment variables for an online run's policy workers and engines under `run.cpu_kernels`:
    "pinned" (nothing: they inherit the driver's kernels, pinned by the CLI) or "native" (the CPU's
    own, `native_env`; ATen's too where the cluster is `one_node`, this machine). SPEECHRL_CPU_KERNELS,
    where set, decides for every process instead: the test suite sets it to avx2 so that its runs
    compute the same floats on any machine."""
    if cpu_kernels not in CPU_KERNELS:
        raise ValueError(f"run.cpu_kernels={cpu_kernels!r}: expected one of {', '.join(CPU_KERNELS)}")
    if (kernels_override() or cpu_kernels) == "pinned":
        return {}
    return native_env(aten=one_node)


def native_bf16(env=None, flags: set[str] | None = None) -> bool:
    """Whether `auto` precision is bf16 on this CPU: it has a bf16 dot product (AVX512-BF16, AMX), the
    process opted in to native kernels (SPEECHRL_CPU_KERNELS=native, as `native_env` sets for a run's
    actors) and oneDNN, which computes bf16 matrix products, is not pinned to AVX2 (`env`, default
    this process's environment). A process that never opted in stays fp32, pinned or not."""
    env = os.environ if env is None else env
    flags = cpu_flags() if flags is None else flags
    return (any(f in flags for f in BF16_DOT_FLAGS) and env.get("SPEECHRL_CPU_KERNELS", "").lower() == "native"
            and env.get("ONEDNN_MAX_CPU_ISA") != PINNED["ONEDNN_MAX_CPU_ISA"])


def precision_report(dtype) -> dict[str, str]:
    """What a process computes in (`dtype`: a torch dtype or vLLM's name for one) and on which of
    torch's CPU code paths: an online run records it per actor in <run>/placement.json."""
    import torch

    return {"dtype": str(dtype).removeprefix("torch."), "cpu_kernels": torch.backends.cpu.get_cpu_capability()}
