"""Seeds, random-generator state and thread counts: what makes a run repeatable and resumable."""
from __future__ import annotations

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    import random

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    import random

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def set_threads(n: int, share: int = 1) -> int:
    """Intra-op threads: n, or with n=0 every CPU of this machine, divided among `share` processes
    that compute at once (trainer ranks). Set explicitly because a Ray actor starts with
    OMP_NUM_THREADS=1 (its num_cpus); the RL phases take turns, so the phase running may use every core."""
    torch.set_num_threads(thread_count(n, share))
    return torch.get_num_threads()


def thread_count(n: int, share: int = 1) -> int:
    """What `set_threads` asks torch for (it may refuse: vLLM's CPU backend pins its process's threads)."""
    import os

    return n if n > 0 else max(1, (os.cpu_count() or 1) // share)
