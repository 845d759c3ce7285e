"""algorithm -> its run function `run(cfg, resume=None) -> summary`, each imported when used (the
online loop's brings Ray and vLLM)."""
from __future__ import annotations

from speechrl.rlhf.core.checks import ONLINE_ALGORITHMS


def _runner(module: str, name: str):
    def load():
        import importlib

        return getattr(importlib.import_module(f"speechrl.rlhf.trainers.{module}"), name)
    return load


RUNNERS = {"sft": _runner("sft", "run_sft"), "dpo": _runner("dpo", "run_dpo"),
           "reward_model": _runner("reward_model", "run_reward_model"), "mtp_heads": _runner("mtp_heads", "run_mtp_heads"),
           **{name: _runner("online", "run_online") for name in ONLINE_ALGORITHMS}}
