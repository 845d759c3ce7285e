"""Ray for an online run: a local cluster with room for the run's actors, or the recipe's cluster."""
from __future__ import annotations

import logging
import math
import os

from speechrl.rlhf.core.config import RecipeConfig, RecipeError
from speechrl.rlhf.core.kernels import pinned_env

log = logging.getLogger(__name__)


def start_ray(cfg: RecipeConfig) -> bool:
    """Connect to Ray for a run: True where this call started a local cluster, which the run then shuts
    down; False where Ray was already up in this process (the caller's) or `ray.address` names a
    cluster, which the run leaves running."""
    import ray

    if ray.is_initialized():
        return False
    # the policy/reward workers import torch & transformers: keep their logs quiet and threads bounded
    # and the kernel pinning (core/kernels.py): local workers inherit it, a remote cluster's would not
    env = {"TOKENIZERS_PARALLELISM": "false", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **pinned_env()}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, runtime_env={"env_vars": env}, log_to_driver=True)
        return False
    else:
        # Logical CPUs for the actors' placement. The loop's phases take turns (generate, then score,
        # then update), so every actor may hold a CPU even on a machine with fewer cores.
        # policy worker + engines + what rewards declare (rewards without `resources` ask for none)
        reward_cpus = math.ceil(sum(r.resources.num_cpus * r.resources.replicas for r in cfg.rewards))
        actors = 1 + cfg.rollout.num_workers + reward_cpus
        if cfg.ray.num_cpus is not None and cfg.ray.num_cpus < actors:
            # Ray would leave the extra actors pending forever: fail now, not hang
            raise RecipeError(f"ray.num_cpus={cfg.ray.num_cpus} but the run places actors needing {actors} CPUs "
                              f"(the policy worker, rollout.num_workers={cfg.rollout.num_workers} engines and "
                              f"{reward_cpus} for rewards' resources); set ray.num_cpus>={actors} or lower "
                              f"rollout.num_workers")
        # address="local": a cluster of its own, always. A plain ray.init() would join the cluster whose
        # address the machine's last `ray start` left in /tmp/ray/ray_current_cluster, even a dead one
        # (a soak's resume failed so: "When connecting to an existing cluster, num_cpus ... must not be provided")
        ray.init(address="local", num_cpus=cfg.ray.num_cpus or max(actors, os.cpu_count() or 2),
                 num_gpus=cfg.ray.num_gpus, include_dashboard=False,
                 runtime_env={"env_vars": env}, log_to_driver=True)
        return True
