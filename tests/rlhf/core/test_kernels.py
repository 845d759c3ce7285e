"""The CPU kernels' pinning (core/kernels.py): which variables undo it for an online run's actors, and
that a child process given them really computes on the CPU's own code path."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from speechrl.rlhf.core.devices import compute_dtype
from speechrl.rlhf.core.kernels import (PINNED, actor_env, cpu_flags, has_avx2, native_bf16, native_env, pin_cpu_kernels,
                                        pinned_env, precision_report)

AVX512 = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"}


def test_native_env_names_the_best_aten_path_the_flags_allow(monkeypatch):
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    unpinned = {"MKL_CBWR": "AUTO", "ONEDNN_MAX_CPU_ISA": "ALL", "SPEECHRL_CPU_KERNELS": "native"}
    assert native_env(AVX512 | {"avx512_bf16"}) == {**unpinned, "ATEN_CPU_CAPABILITY": "avx512"}
    assert native_env({"avx2", "avx512f"})["ATEN_CPU_CAPABILITY"] == "avx2", "AVX-512 without BW/VL/DQ is not ATen's"
    assert native_env({"sse4_2"})["ATEN_CPU_CAPABILITY"] == "default"
    assert native_env(AVX512, aten=False) == unpinned, "another node's CPU is unknown: ATen keeps the AVX2 pin"
    assert native_env(set()) == {}, "flags unread (not Linux): nothing was pinned, nothing to undo"
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert native_env(AVX512) == {}, "nothing is pinned off x86-64"


def test_auto_bf16_needs_a_bf16_dot_product_the_opt_in_and_unpinned_onednn():
    bf16 = AVX512 | {"avx512_bf16"}
    native = {"SPEECHRL_CPU_KERNELS": "native"}
    assert native_bf16(env=native, flags=bf16)
    assert native_bf16(env={**native, "ATEN_CPU_CAPABILITY": "avx2"}, flags={"avx2", "amx_bf16"}), \
        "ATen's path does not carry the matrix products"
    assert not native_bf16(env={**native, **PINNED}, flags=bf16), "oneDNN on AVX2 has no bf16 dot product"
    assert not native_bf16(env=native, flags=AVX512)
    assert not native_bf16(env={}, flags=bf16), "a library user who never opted in stays fp32"


def test_actor_env_follows_the_recipe_unless_the_environment_decides(monkeypatch):
    monkeypatch.delenv("SPEECHRL_CPU_KERNELS", raising=False)
    assert actor_env("pinned") == {}, "pinned: the actors inherit the driver's kernels"
    assert actor_env("native") == native_env()
    assert actor_env("native", one_node=False) == native_env(aten=False)
    for pin in ("avx2", "pinned", "AVX2"):  # as the test suite sets it
        monkeypatch.setenv("SPEECHRL_CPU_KERNELS", pin)
        assert actor_env("native") == {}, pin
    monkeypatch.setenv("SPEECHRL_CPU_KERNELS", "native")
    assert actor_env("pinned") == native_env()
    with pytest.raises(ValueError, match="run.cpu_kernels='fast'"):
        actor_env("fast")
    monkeypatch.setenv("SPEECHRL_CPU_KERNELS", "fastest")
    with pytest.raises(ValueError, match="SPEECHRL_CPU_KERNELS='fastest': expected native"):
        actor_env("native")
    with pytest.raises(ValueError, match="SPEECHRL_CPU_KERNELS='fastest'"):
        pin_cpu_kernels()


@pytest.mark.skipif(not has_avx2(), reason="the pinning applies to x86-64 CPUs with AVX2")
def test_a_child_given_native_env_computes_on_the_cpus_own_path_and_a_pinned_one_on_avx2():
    """What a Ray actor's runtime_env does: its variables override the pinned ones it inherits."""
    code = ("import torch; torch.ones(4).sum(); "
            "from speechrl.rlhf.core.devices import compute_dtype; "
            "print(torch.backends.cpu.get_cpu_capability(), compute_dtype('auto', torch.device('cpu')))")
    env = {**os.environ, **PINNED}

    def child(extra):
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()

    assert child({}) == ["AVX2", "torch.float32"], "pinned: AVX2, and auto stays fp32"
    best = native_env()["ATEN_CPU_CAPABILITY"].upper()
    bf16 = any(f in cpu_flags() for f in ("avx512_bf16", "amx_bf16"))
    assert child(native_env()) == [best, "torch.bfloat16" if bf16 else "torch.float32"]
    assert child(native_env(aten=False)) == ["AVX2", "torch.bfloat16" if bf16 else "torch.float32"]
    unpinned = {k: v for k, v in os.environ.items() if k not in PINNED and k != "SPEECHRL_CPU_KERNELS"}
    out = subprocess.run([sys.executable, "-c", code], env=unpinned, capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[1] == "torch.float32", "never opted in: fp32, on whatever kernels"


def test_this_pinned_test_process_computes_fp32_under_auto():
    if has_avx2():
        assert pinned_env() == PINNED and precision_report(torch.float32) == {"dtype": "float32", "cpu_kernels": "AVX2"}
    assert compute_dtype("auto", torch.device("cpu")) == torch.float32


def test_the_engines_dtype_follows_the_same_rule():
    from speechrl.rollouts.engine import vllm_dtype

    if not torch.cuda.is_available():
        assert vllm_dtype("auto") == "float32", "a pinned process: fp32, as the engines always ran on CPU"
    assert vllm_dtype("bf16") == "bfloat16" and vllm_dtype("fp32") == "float32"
