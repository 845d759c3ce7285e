"""Rewards defined outside speechrl, found by dotted path or entry point in test_registry.py."""


def length_reward(completions, scale=1.0, **kwargs):
    return [scale * len(c) for c in completions]


class ConstantReward:
    def __init__(self, value=1.0):
        self.value = value

    def __call__(self, completions, **kwargs):
        return [self.value] * len(completions)


NOT_CALLABLE = 3
