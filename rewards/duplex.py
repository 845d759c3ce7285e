"""The duplex mode's turn-taking reward: each chunk's decision against what a good assistant does
then, one component per turn-taking axis (Full-Duplex-Bench's, and Kyutai's GRPO on Moshi rewarded
each axis apart). The chunk labels and the tool-call form live here so the mode and the reward read
one definition (docs/duplex.md has the table).

A chunk is scored from its label (`duplex_label`), whether it holds audio (`speaks`), its action text
(`action_text`, None without one) and, where a call is due, the expected one (`duplex_action`):

  response     -1: speaking while the user has the floor (barge-in), or silent when the answer is due
  pause        -1: speaking during a pause mid-sentence (a take-over)
  backchannel  -1: falling silent while the user backchannels
  interrupt    -1: still speaking after the user cut in (the chunk they start in is free)
  tool         -1: a due call missing or not the expected JSON, or a call where none is due
"""
from __future__ import annotations

import json
from typing import Any, Optional, Sequence

LISTEN = "listen"  # the user speaks, or nobody does yet: stay silent (speaking is a barge-in)
PAUSE = "pause"  # the user paused mid-sentence: stay silent (speaking is a take-over)
SPEAK = "speak"  # the assistant's turn: speak (silence is a late or dropped reply)
BACKCHANNEL = "backchannel"  # the user backchannels while the assistant speaks: keep speaking
STOP = "stop"  # the user interrupted: be silent (speaking is a late stop)
EITHER = "either"  # the chunk an interruption starts in: stopping or not is fine
ACT = "act"  # a tool call is due: the action channel must hold exactly the expected call
LABELS = (LISTEN, PAUSE, SPEAK, BACKCHANNEL, STOP, EITHER, ACT)
COMPONENTS = ("response", "pause", "backchannel", "interrupt", "tool")


def action_text(call: dict) -> str:
    """A tool call in the action channel's fixed form: compact JSON, keys in the order built."""
    return json.dumps(call, separators=(",", ":"))


def same_action(said: Optional[str], expected: Optional[str]) -> bool:
    """Whether an action text is the expected call: equal JSON values (key order and spacing do not
    matter; text that is not JSON matches nothing)."""
    if not said or not expected:
        return False
    try:
        return json.loads(said) == json.loads(expected)
    except (ValueError, TypeError):
        return False


def chunk_penalties(label: str, speaks: bool, action: Optional[str], expected: Optional[str]) -> dict[str, float]:
    """Each component's score (0 or -1) of one chunk's decision (the module docstring's table)."""
    if label not in LABELS:
        raise ValueError(f"duplex_turn_taking: unknown chunk label {label!r}; labels are {', '.join(LABELS)}")
    out = dict.fromkeys(COMPONENTS, 0.0)
    acts = bool(action)
    if label == LISTEN and speaks or label == SPEAK and not speaks:
        out["response"] = -1.0
    elif label == PAUSE and (speaks or acts):
        out["pause"] = -1.0
    elif label == BACKCHANNEL and not speaks:
        out["backchannel"] = -1.0
    elif label == STOP and speaks:
        out["interrupt"] = -1.0
    if label == ACT and not same_action(action, expected) or label != ACT and acts:
        out["tool"] = -1.0
    return out


class DuplexTurnTakingReward:
    """reward = the weighted sum of the chunk's components (each 0 or -1; weights are kwargs, 1 each).

    Columns: `duplex_label`, `speaks`, `action_text`, `duplex_action` (the duplex mode fills them)."""

    def __init__(self, response: float = 1.0, pause: float = 1.0, backchannel: float = 1.0, interrupt: float = 1.0,
                 tool: float = 1.0):
        self.weights = {"response": response, "pause": pause, "backchannel": backchannel, "interrupt": interrupt,
                        "tool": tool}
        bad = {k: w for k, w in self.weights.items() if not isinstance(w, (int, float)) or w < 0 or w != w}
        if bad:
            raise ValueError(f"duplex_turn_taking: weights must be numbers >= 0, got {bad}")

    def __call__(self, completions: list[str], duplex_label: Optional[Sequence[str]] = None,
                 speaks: Optional[Sequence[bool]] = None, action_text: Optional[Sequence[Optional[str]]] = None,
                 duplex_action: Optional[Sequence[Optional[str]]] = None, **_: Any) -> dict[str, list[float]]:
        if duplex_label is None or speaks is None:
            raise KeyError("duplex_turn_taking: the batch has no `duplex_label` / `speaks` columns; it scores the "
                           "duplex mode's chunks (mode: duplex)")
        n = len(completions)
        actions = action_text if action_text is not None else [None] * n
        expected = duplex_action if duplex_action is not None else [None] * n
        rows = [chunk_penalties(label, bool(s), a, e) for label, s, a, e in zip(duplex_label, speaks, actions, expected)]
        out = {name: [r[name] for r in rows] for name in COMPONENTS}
        out["reward"] = [sum(self.weights[k] * r[k] for k in COMPONENTS) for r in rows]
        return out
