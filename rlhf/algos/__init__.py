"""Pure tensor functions of RL post-training, each registered by name (see registry.py).

Importing this package imports every module, which fills the registries.
"""
from speechrl.rlhf.algos import aggregate, grpo_advantage, kl, policy_loss, preference  # noqa: F401  (fills registries)
from speechrl.rlhf.algos.registry import ADVANTAGES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, PREFERENCE_LOSSES

__all__ = ["ADVANTAGES", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "POLICY_LOSSES", "PREFERENCE_LOSSES"]
