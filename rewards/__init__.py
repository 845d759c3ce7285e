"""Rewards: plain callables over a batch returning one score per completion, or named components.

The call is TRL's (`completions`, dataset columns as keyword arguments; the score under "reward"
when there are components), so a reward written for TRL works here as it is. docs/rewards.md is the
guide and lists every built-in reward, the columns it reads and its settings.
"""
