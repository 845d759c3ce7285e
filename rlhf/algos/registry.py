"""The algorithm registries: recipes name an estimator or loss, the trainer looks it up here."""
from __future__ import annotations

from speechrl.rlhf.core.registry import Registry

ADVANTAGES = Registry("advantage estimator")
POLICY_LOSSES = Registry("policy loss")
KL_ESTIMATORS = Registry("KL estimator")
LOSS_AGGREGATIONS = Registry("loss aggregation")
PREFERENCE_LOSSES = Registry("preference loss")
RECIPE_CHECKS = Registry("recipe check")  # algorithm -> check(cfg, source): what it asks of the rest of the recipe
