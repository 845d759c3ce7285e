"""The optimizer side of a trainer: AdamW with warm-up + cosine schedule and clipping, or DeepSpeed."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch

from speechrl.rlhf.model.sharding import full_optimizer_state, shard_optimizer_state, sharded


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to min_ratio (a pure function, so resume is exact)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Optimizer:
    """AdamW + schedule + clipping, or the same through DeepSpeed; one `step(loss)` for both.

    DeepSpeed on CPU runs one gloo process; on a cluster the launcher sets the env it reads.
    """

    def __init__(self, model: torch.nn.Module, train_cfg, total_steps: int, *, updates_per_step: int = 1,
                 extra_params: Sequence[torch.nn.Parameter] = (), side_params: Sequence[torch.nn.Parameter] = ()):
        """`updates_per_step`: optimizer steps in one of the run's steps (RL: epochs x minibatches), so
        warm-up and decay follow the run's steps; `extra_params` train beside the model's (PPO's value
        head); `side_params` too, in a group of their own whose gradients are clipped on their own, so
        they never change the model's update (MTP heads: model/mtp.py)."""
        self.cfg = train_cfg
        params = [p for p in model.parameters() if p.requires_grad] + list(extra_params)
        groups = [{"params": params}] + ([{"params": list(side_params)}] if side_params else [])
        self.optimizer = torch.optim.AdamW(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        warmup, total = train_cfg.warmup_steps * updates_per_step, total_steps * updates_per_step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, warmup, total, train_cfg.lr_min_ratio))
        self.engine = None
        self.model = model
        if train_cfg.deepspeed.enabled:
            self.engine = _deepspeed_engine(model, self.optimizer, self.scheduler, train_cfg)
            self.model = self.engine

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
        else:
            loss.backward()

    def step(self) -> dict:
        # the rate this update applies: read before the scheduler moves on to the next step's
        lr = self.scheduler.get_last_lr()[0]
        if self.engine is not None:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return {"grad_norm": float(norm) if norm is not None else float("nan"), "lr": lr}
        norm, *_ = [torch.nn.utils.clip_grad_norm_(g["params"], self.cfg.max_grad_norm)
                    for g in self.optimizer.param_groups]  # the model's group first; side params alone
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm), "lr": lr}

    def save(self, path: Path) -> None:
        """optimizer.pt, or DeepSpeed's checkpoint. Sharded (model/sharding.py) every rank gathers its
        moments to full tensors and rank 0 writes them in the one-rank format, so a checkpoint resumes
        on any number of ranks. (torch.distributed.checkpoint would reshard too, but in a format of its
        own that one-rank runs and their older checkpoints do not have.)"""
        if self.engine is not None:
            self.engine.save_checkpoint(str(path / "deepspeed"))
            return
        state = self.optimizer.state_dict()
        if sharded():
            state = full_optimizer_state(state)
            if torch.distributed.get_rank() != 0:
                return
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"optimizer": state, "scheduler": self.scheduler.state_dict()}, path / "optimizer.pt")

    def load(self, path: Path) -> None:
        if self.engine is not None:
            self.engine.load_checkpoint(str(path / "deepspeed"), load_module_strict=False)
            return
        state = torch.load(path / "optimizer.pt", weights_only=False)
        if sharded():
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            state["optimizer"] = shard_optimizer_state(state["optimizer"], params)
        self.optimizer.load_state_dict(self._matching_groups(state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        groups = self.optimizer.param_groups
        if len(self.scheduler.base_lrs) != len(groups):  # saved with or without the side group
            self.scheduler.base_lrs = [g["initial_lr"] for g in groups]
            self.scheduler._last_lr = [g["lr"] for g in groups]

    def _matching_groups(self, state: dict) -> dict:
        """A saved optimizer state whose groups match this optimizer's: a checkpoint written with side
        params (MTP heads) that this run does not train, or without those this run trains (a run on
        several ranks, which skips the heads), resumes with the model's group as saved and the side
        group fresh."""
        saved, current = state["param_groups"], self.optimizer.param_groups
        if len(saved) == len(current):
            return state
        if len(saved) == len(current) + 1:  # drop the saved side group and its moments
            dropped = set(saved[-1]["params"])
            return {"state": {k: v for k, v in state["state"].items() if k not in dropped},
                    "param_groups": saved[:-1]}
        if len(saved) == len(current) - 1:  # add an empty side group: its params start without moments
            start = 1 + max((i for g in saved for i in g["params"]), default=-1)
            side = {k: v for k, v in current[-1].items() if k != "params"}
            side["params"] = list(range(start, start + len(current[-1]["params"])))
            return {"state": state["state"], "param_groups": [*saved, side]}
        raise ValueError(f"a checkpoint's optimizer has {len(saved)} parameter groups, this run's {len(current)}")


def _deepspeed_engine(model, optimizer, scheduler, train_cfg):
    import deepspeed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
        os.environ.setdefault(key, value)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # DeepSpeed runs one rank here (core/checks.py), so its shared-memory all-reduce for CPU ranks has no
    # peer; without this it JIT-compiles that op with g++ as it starts on a CPU machine (80 CPU-seconds,
    # again for every new venv). DeepSpeed keeps this dict for edits (deepspeed/ops/__init__.py).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend)
    config = {"train_micro_batch_size_per_gpu": train_cfg.batch_size, "gradient_accumulation_steps": 1,
              "gradient_clipping": train_cfg.max_grad_norm,
              "zero_optimization": {"stage": train_cfg.deepspeed.zero_stage}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine
