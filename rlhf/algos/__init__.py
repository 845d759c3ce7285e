"""Pure tensor functions of RL post-training; those a recipe picks by name are registered (registry.py).

Importing this package imports every module, which fills the registries. PPO's pieces (gae,
kl_reward, value_loss) have one form each and are called directly by a trainer with a critic.
"""
from speechrl.rlhf.algos import (aggregate, gae, grpo_advantage, kl, kl_reward,  # noqa: F401  (fills registries)
                                 policy_loss, preference, value_loss)
from speechrl.rlhf.algos.registry import ADVANTAGES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, PREFERENCE_LOSSES

__all__ = ["ADVANTAGES", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "POLICY_LOSSES", "PREFERENCE_LOSSES"]
