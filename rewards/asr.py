"""Verifiable ASR reward: error rate against the reference transcript, minus penalties for the
failure modes RL finds first (saying nothing, looping, running on past the end of the speech).

Penalties are separate from the error rate because the capped error rate cannot see them: a
looping hypothesis and a merely wrong one both cap at `wer_cap`, but only one should be trained
away harder. Each penalty is also returned as a 0/1 component, so its rate shows in the logs.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Optional, Sequence

import jiwer

from speechrl.rewards.normalize import normalize_text

_MAX_LOOP_NGRAM = 4  # loops of 1..4 words ("the the the", "go left go left go left")


def _rate(measure, hyp: str, ref: str) -> float:
    # An empty reference (a silent clip) has no words to err on: the only right answer is an
    # empty hypothesis (0.0); anything else is wholly wrong (1.0) rather than an undefined ratio.
    if not ref:
        return 0.0 if not hyp else 1.0
    return float(measure(reference=ref, hypothesis=hyp))


def word_error_rate(hyp: str, ref: str) -> float:
    """WER of `hyp` against `ref` after `normalize_text`; CJK text is scored per character."""
    return _rate(jiwer.wer, normalize_text(hyp), normalize_text(ref))


def char_error_rate(hyp: str, ref: str) -> float:
    """CER after `normalize_text`, without the spaces WER puts between CJK characters (they would
    count as characters and halve the rate)."""
    return _rate(jiwer.cer, normalize_text(hyp, split_cjk=False), normalize_text(ref, split_cjk=False))


def has_word_loop(words: Sequence[str], min_repeats: int = 3) -> bool:
    """True if some n-gram (n = 1..4) occurs `min_repeats` or more times back to back."""
    for n in range(1, _MAX_LOOP_NGRAM + 1):
        for i in range(len(words) - n * min_repeats + 1):
            gram, count, j = words[i:i + n], 1, i + n
            while words[j:j + n] == gram:
                count, j = count + 1, j + n
                if count >= min_repeats:
                    return True
    return False


def longest_token_run(ids: Sequence[int]) -> int:
    return max((sum(1 for _ in group) for _, group in itertools.groupby(ids)), default=0)


class AsrWerReward:
    """reward = -min(error rate, wer_cap) - penalties, per sample; a None reference scores NaN.

    The 0/1 penalties (logged with "wer" and "cer") tell apart failures a capped error rate cannot:
    "empty" (nothing said where the reference has words), "repetition" (a word loop the reference lacks,
    or `loop_token_run` equal ids in a row), "runaway" (over `max_length_ratio` * reference words + 2).
    """

    def __init__(
        self,
        metric: str = "wer",  # "wer" or "cer": which error rate the reward uses
        empty_penalty: float = 1.0,
        repetition_penalty: float = 0.5,
        length_penalty: float = 0.5,  # applied to runaway outputs
        max_length_ratio: float = 2.0,
        wer_cap: float = 1.0,  # insertions can push WER past 1; cap so a loop's score stays bounded
        reference_column: str = "text",  # dataset column holding the reference transcript
        loop_repeats: int = 3,  # back-to-back repeats of an n-gram that count as a loop
        loop_token_run: int = 16,  # identical completion token ids in a row that count as a loop
    ):
        if metric not in ("wer", "cer"):
            raise ValueError(f"AsrWerReward: metric={metric!r}; use 'wer' or 'cer'")
        if wer_cap <= 0 or max_length_ratio <= 0:
            raise ValueError(f"AsrWerReward: wer_cap ({wer_cap}) and max_length_ratio ({max_length_ratio}) must be > 0")
        if loop_repeats < 2 or loop_token_run < 2:
            raise ValueError(f"AsrWerReward: loop_repeats ({loop_repeats}) and loop_token_run ({loop_token_run}) must be >= 2")
        self.metric = metric
        self.empty_penalty = empty_penalty
        self.repetition_penalty = repetition_penalty
        self.length_penalty = length_penalty
        self.max_length_ratio = max_length_ratio
        self.wer_cap = wer_cap
        self.reference_column = reference_column
        self.loop_repeats = loop_repeats
        self.loop_token_run = loop_token_run

    def __call__(
        self, completions: list[str], completion_ids: Optional[list[list[int]]] = None, **kwargs: Any
    ) -> dict[str, list[float]]:
        if self.reference_column not in kwargs:
            raise KeyError(
                f"asr_wer: no reference column {self.reference_column!r} in the batch (columns: "
                f"{', '.join(sorted(kwargs))}); set the reward's kwargs.reference_column"
            )
        refs = kwargs[self.reference_column]
        ids = completion_ids if completion_ids is not None else [None] * len(completions)
        out: dict[str, list[float]] = {k: [] for k in ("reward", "wer", "cer", "empty", "repetition", "runaway")}
        for hyp, ref, tokens in zip(completions, refs, ids, strict=True):
            for key, value in self._score_one(hyp, ref, tokens).items():
                out[key].append(value)
        return out

    def _score_one(self, hyp: str, ref: Optional[str], tokens: Optional[Sequence[int]]) -> dict[str, float]:
        if ref is None:
            return dict.fromkeys(("reward", "wer", "cer", "empty", "repetition", "runaway"), math.nan)
        hyp_words, ref_words = normalize_text(hyp).split(), normalize_text(ref).split()
        wer = _rate(jiwer.wer, " ".join(hyp_words), " ".join(ref_words))
        cer = char_error_rate(hyp, ref)
        empty = not hyp_words and bool(ref_words)
        # A loop the reference itself has ("no no no") is a correct transcript, not a failure.
        word_loop = has_word_loop(hyp_words, self.loop_repeats) and not has_word_loop(ref_words, self.loop_repeats)
        token_loop = tokens is not None and longest_token_run(tokens) >= self.loop_token_run
        repetition = word_loop or token_loop
        runaway = len(hyp_words) > self.max_length_ratio * len(ref_words) + 2
        error = wer if self.metric == "wer" else cer
        reward = (
            -min(error, self.wer_cap)
            - self.empty_penalty * empty
            - self.repetition_penalty * repetition
            - self.length_penalty * runaway
        )
        return {"reward": reward, "wer": wer, "cer": cer,
                "empty": float(empty), "repetition": float(repetition), "runaway": float(runaway)}
