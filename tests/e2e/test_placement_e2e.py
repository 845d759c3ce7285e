"""Whole GRPO runs placed by ray.layout: on a "one-GPU machine" (one logical GPU: Ray schedules it as
a GPU, torch here has none) and on a two-node Ray cluster started on loopback with `ray start`, as a
cluster's users start theirs. Each run's placement.json says where its actors landed."""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from speechrl.rlhf.core.config import RecipeError, load_recipe
from speechrl.rlhf.core.kernels import BF16_DOT_FLAGS, PINNED, cpu_flags, has_avx2, native_env, pinned_env
from speechrl.rlhf.trainers.online import run_online

pytestmark = [pytest.mark.vllm, pytest.mark.ray]

SMALL = ["data.synthetic.num_utterances=60", "data.max_eval_examples=4", "rl.prompts_per_step=2",
         "rollout.sampling.n=4", "rollout.sampling.max_new_tokens=8", "eval_max_new_tokens=8",
         "rollout.kv_cache_gib=0.25", "train.batch_size=8", "train.steps=2", "train.eval_every=2",
         "rollout.num_workers=1", "train.torch_threads=1", "rollout.threads_per_worker=1"]


def test_a_one_gpu_machine_runs_colocated_and_refuses_separate_before_starting(tiny_overrides, tmp_path, monkeypatch):
    base = [*tiny_overrides, *SMALL, f"run.output_dir={tmp_path}", "ray.num_cpus=2", "ray.num_gpus=1"]
    with pytest.raises(RecipeError, match=r"ray.layout=separate: .* need 2 GPUs but the Ray cluster has 1"):
        run_online(load_recipe("asr/grpo", [*base, "run.name=separate", "ray.layout=separate"]))
    assert not (tmp_path / "separate" / "placement.json").exists(), "refused before any actor started"

    # the policy worker is already starting as the engines start, which returns once they answer (no
    # CUDA under the logical GPU: the engines never sleep, so nothing waits for vLLM to size its cache)
    from speechrl.rlhf.trainers import online

    started = []
    for name in ("make_policy_workers", "make_rollout_workers"):
        def record(*args, _start=getattr(online, name), _name=name, **kw):
            started.append(_name)
            return _start(*args, **kw)
        monkeypatch.setattr(online, name, record)
    summary = run_online(load_recipe("asr/grpo", [*base, "run.name=colocated", "ray.layout=colocated"]))
    assert started == ["make_policy_workers", "make_rollout_workers"], started
    assert 0 < summary["start-up time (s)"]
    placement = json.loads((tmp_path / "colocated" / "placement.json").read_text())
    assert placement["layout"] == "colocated" and placement["bundles"] == [{"GPU": 1, "CPU": 2}]
    assert set(placement["actors"]) == {"policy", "engine 0"} and len(placement["nodes"]) == 1
    assert summary["steps"] == 2 and summary["logprob gap vLLM/trainer"] < 1e-3
    if has_avx2():  # the suite pins every run's actors (tests/conftest.py), whatever asr/grpo's run.cpu_kernels
        assert set(map(json.dumps, placement["precision"].values())) == \
            {json.dumps({"dtype": "float32", "cpu_kernels": "AVX2"})}, placement["precision"]


@pytest.mark.skipif(not has_avx2(), reason="the kernels are pinned on x86-64 CPUs with AVX2 only")
def test_native_cpu_kernels_give_the_actors_the_cpus_own_path_and_bf16_where_it_has_a_dot_product(
        tiny_overrides, tmp_path, monkeypatch):
    """run.cpu_kernels=native (asr/grpo's own setting) with the driver pinned: the policy worker and the
    engine compute on the CPU's best code path, in bf16 where the CPU has AVX512-BF16 or AMX (fp32
    elsewhere); the engine samples what the trainer scores within bf16's rounding."""
    monkeypatch.delenv("SPEECHRL_CPU_KERNELS")  # the suite's "pin everything" (tests/conftest.py)
    summary = run_online(load_recipe("asr/grpo", [*tiny_overrides, *SMALL, f"run.output_dir={tmp_path}",
                                                  "run.name=native", "ray.num_cpus=2", "run.cpu_kernels=native"]))
    placement = json.loads((tmp_path / "native" / "placement.json").read_text())
    bf16 = any(f in cpu_flags() for f in BF16_DOT_FLAGS)
    expected = {"dtype": "bfloat16" if bf16 else "float32", "cpu_kernels": native_env()["ATEN_CPU_CAPABILITY"].upper()}
    assert placement["precision"] == {"policy": expected, "engine 0": expected}
    assert pinned_env() == PINNED, "the driver, which builds the assets, stays pinned"
    assert summary["steps"] == 2 and 0 <= summary["logprob gap vLLM/trainer"] < (0.05 if bf16 else 1e-3)
    rows = [json.loads(r) for r in (tmp_path / "native" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive_nodes(address: str, env: dict) -> list[str]:
    """Node ids of the cluster, asked by a separate driver (this test process keeps out of it)."""
    code = (f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
            "print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive']))")
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:  # no GCS answering yet
        return []
    return out.stdout.split() if out.returncode == 0 else []


@pytest.fixture
def loopback_cluster(tmp_path):
    """A head and a worker node, each its own `ray start --block` on this machine (two raylets, two
    object stores), with token auth as Ray 2.60 needs for a second node; stopped by signalling those two
    processes only (`ray stop` would also stop every other Ray of the machine). The cluster keeps its
    files in a temp dir of its own: `ray start` writes the address of the last cluster it started there,
    and in /tmp/ray that file would send every later plain `ray.init()` of the machine (the other
    tests' local clusters) to this one once it is gone. A node whose start-up times out (Ray waits 30 s
    for its raylet, which a loaded machine can miss) is started again."""
    ray_cli = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats", "--block"]
    procs, address = [], ""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live under it

    def start(name: str, nodes: int) -> None:
        nonlocal address
        for attempt in range(3):
            if name == "head":  # a fresh port each try: a failed head may hold its port a while
                address = f"127.0.0.1:{_free_port()}"
            args = (["--head", f"--port={address.split(':')[1]}", "--include-dashboard=false",
                     f"--temp-dir={temp_dir}"] if name == "head" else [f"--address={address}"])
            with open(tmp_path / f"{name}-{attempt}.log", "w") as log:  # the child keeps its own descriptor
                proc = subprocess.Popen([ray_cli, "start", *args, *common], env=env, stdout=log, stderr=log)
            procs.append(proc)
            deadline = time.time() + 240
            while proc.poll() is None and time.time() < deadline:
                if len(_alive_nodes(address, env)) >= nodes:
                    return
                time.sleep(2)
            proc.terminate()
        raise AssertionError(f"the {name} node did not start in 3 tries: see {tmp_path}/{name}-*.log")

    try:
        start("head", 1)
        start("worker", 2)
        yield address, env, _alive_nodes(address, env)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_two_rank_grpo_run_spans_both_nodes_of_a_loopback_cluster(loopback_cluster, tiny_overrides, tmp_path):
    """Two FSDP ranks, one per node, and vLLM's weight transfer (`transfer`: gloo on CPU): both ranks gather,
    rank 0 broadcasts to the engine on whichever node it landed; step 2's logprob gap shows the engine
    sampled with the weights step 1 made."""
    address, env, nodes = loopback_cluster
    assert len(nodes) == 2
    speechrl = shutil.which("speechrl") or str(Path(sys.executable).with_name("speechrl"))
    run = subprocess.run([speechrl, "train", "asr/grpo", *tiny_overrides, *SMALL, f"run.output_dir={tmp_path}",
                          "run.name=two-nodes", f"ray.address={address}", "train.num_ranks=2",
                          "ray.placement_strategy=SPREAD", "rollout.weight_transport=transfer"],
                         env=env, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    placement = json.loads((tmp_path / "two-nodes" / "placement.json").read_text())
    assert sorted(placement["nodes"]) == sorted(nodes)
    actors = placement["actors"]
    assert set(actors) == {"policy rank 0", "policy rank 1", "engine 0"}
    # SPREAD deals the bundles over the nodes in turn: the two trainer ranks' process group spans both
    assert actors["policy rank 0"] != actors["policy rank 1"]
    rows = [json.loads(r) for r in (tmp_path / "two-nodes" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["train/logprob_gap"] < 1e-3
    assert (tmp_path / "two-nodes" / "final" / "model.safetensors").is_file()
    assert not Path("/tmp/ray/ray_current_cluster").exists() or \
        address not in Path("/tmp/ray/ray_current_cluster").read_text(), "later plain ray.init()s stay local"
