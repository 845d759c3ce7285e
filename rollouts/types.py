"""What goes into a rollout engine and what comes out: token ids first, text as a view."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class RolloutRequest:
    """One prompt to sample from: chat-rendered text, with one audio placeholder and its audio (ASR)
    or text only (TTS: audio None)."""

    prompt: str  # rendered prompt text, audio placeholder unexpanded (see data.prompts.render_prompt)
    audio: Optional[np.ndarray]  # mono float32 waveform; None for a text-only prompt
    sample_rate: int  # of `audio`; the engine's processor expects the backbone's rate
    metadata: dict = field(default_factory=dict)  # carried to every Sample (example id, reference text, ...)


@dataclass
class Sample:
    """One sampled completion, token in / token out.

    `prompt_ids` are the ids the engine actually conditioned on (audio placeholder expanded), so
    the trainer can reuse them instead of re-tokenizing; `logprobs[t]` is the sampling logprob
    of `completion_ids[t]` (see engine.LOGPROBS_MODE for which distribution).
    """

    prompt_index: int  # index into the request list this sample answers
    sample_index: int  # 0..n-1 within its prompt's group
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str  # completion decoded, special tokens skipped
    finish_reason: str  # "stop" (eos) or "length" (max_new_tokens reached)
    metadata: dict
