"""Two rewards a team ships in its own package. Neither imports speechrl: a reward is a plain
callable over a batch, dataset columns arriving as keyword arguments."""
from __future__ import annotations

import re
from typing import Any, Optional

FILLERS = {"uh", "um", "er", "erm", "hmm"}


class LengthMatch:
    """reward = -|words said - words in the reference| / words in the reference, capped at `cap`.

    A class, because it has settings (its kwargs in the recipe). Returns named components: the
    score under "reward" and the length ratio for the logs. No reference: None (no score).
    """

    def __init__(self, reference_column: str = "text", cap: float = 1.0):
        self.reference_column, self.cap = reference_column, cap

    def __call__(self, completions: list[str], **columns: Any) -> dict[str, list[Optional[float]]]:
        rewards, ratios = [], []
        for hyp, ref in zip(completions, columns[self.reference_column]):
            if ref is None:
                rewards.append(None)
                ratios.append(None)
                continue
            said, expected = len(hyp.split()), max(1, len(ref.split()))
            rewards.append(-min(abs(said - expected) / expected, self.cap))
            ratios.append(said / expected)
        return {"reward": rewards, "length_ratio": ratios}


async def no_filler(completions: list[str], **columns: Any) -> list[float]:
    """-1 per filler word ("uh", "um", ...) in the completion.

    Written async only to show the form: speechrl awaits it. An async reward pays off when it
    waits on something (a service, a judge model behind HTTP); this one waits on nothing.
    """
    return [-float(sum(word in FILLERS for word in re.findall(r"[a-z]+", c.lower()))) for c in completions]
