"""SFT through DeepSpeed (ZeRO-2), run by the CLI in its own process: DeepSpeed leaves a process
group behind it. ~25 s."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from speechrl.rlhf.core.config import load_recipe
from speechrl.rlhf.model.backbone import load_backbone


def losses(run_dir) -> dict[int, float]:
    """The policy's own loss per step: without the MTP heads' term where the run trained heads
    (DeepSpeed runs skip them; model/mtp.py)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r.get("train/token_loss", r["train/loss"]) for r in rows if "train/loss" in r}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_path_trains_and_checkpoints(full_run, sft_overrides):
    overrides = sft_overrides("deepspeed", "train.deepspeed.enabled=true", "train.deepspeed.zero_stage=2",
                              "train.steps=2", "train.checkpoint_every=1")
    cfg = load_recipe("asr/sft", overrides)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    env = {**os.environ, "MASTER_PORT": str(_free_port())}
    proc = subprocess.run([sys.executable, "-m", "speechrl.rlhf.cli.main", "train", "asr/sft", *overrides],
                          capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one rank: DeepSpeed's shared-memory all-reduce op, which it would JIT-compile with g++, is not built
    assert "shm_comm" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]

    loss, plain = losses(run_dir), losses(full_run[1])
    assert sorted(loss) == [1, 2] and all(math.isfinite(v) for v in loss.values())
    # same data, init and warm-up: the DeepSpeed optimizer takes the same first steps as plain AdamW
    for step in (1, 2):
        assert loss[step] == pytest.approx(plain[step], rel=1e-4)
    for step in (1, 2):
        ckpt = run_dir / "checkpoints" / f"step-{step}"
        assert (ckpt / "trainer_state.pt").is_file() and (ckpt / "deepspeed").is_dir()
    load_backbone(run_dir / "final")
