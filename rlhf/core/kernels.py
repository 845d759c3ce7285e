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
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def has_avx2() -> bool:
    """Whether this is an x86-64 CPU with AVX2 (Linux: /proc/cpuinfo's flags)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def pin_cpu_kernels() -> dict[str, str]:
    """Set the variables that pin torch, MKL and oneDNN to their AVX2 paths, where not set already,
    on an x86-64 CPU with AVX2; child processes (Ray's workers) inherit them. Returns what it set.
    It must run before torch's first computation in this process: later, the paths are chosen."""
    if os.environ.get("SPEECHRL_CPU_KERNELS", "avx2").lower() == "native" or not has_avx2():
        return {}
    added = {k: v for k, v in PINNED.items() if k not in os.environ}
    os.environ.update(added)
    return added


def pinned_env() -> dict[str, str]:
    """The pinning variables as this process has them: what a remote Ray cluster's workers need too."""
    return {k: os.environ[k] for k in PINNED if k in os.environ}
