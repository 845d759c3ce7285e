"""RL post-training's algorithms: pure tensor functions (estimators, losses, KL) registered by name
(registry.py), and the online updates built from them (updates.py: GRPO, PPO, online DPO).

Importing this package imports every module, which fills the registries. kl_reward and value_loss
have one form each and are called directly.
"""
from speechrl.rlhf.algos import (aggregate, estimators, kl, policy_loss, preference,  # noqa: F401  (fills registries)
                                 updates)
from speechrl.rlhf.algos.registry import ADVANTAGES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, PREFERENCE_LOSSES
from speechrl.rlhf.algos.updates import UPDATES

__all__ = ["ADVANTAGES", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "POLICY_LOSSES", "PREFERENCE_LOSSES", "UPDATES"]
