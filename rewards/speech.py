"""What the speech rewards share: reading the batch's waveforms, and `speech_sanity`.

TTS batches carry, per sample, the generated waveform in `audio` (float32 mono, decoded from the
completion's codec tokens), the input text in `text` and optionally a voice prompt in
`reference_audio`; `sample_rate` is one value for the batch (docs/rewards.md, "Speech rewards").
The judges (ASR, speaker encoder, MOS) all listen at 16 kHz.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import soxr

from speechrl.rewards.api import Unscored
from speechrl.rewards.normalize import normalize_text

JUDGE_RATE = 16000


def waveforms(columns: dict[str, Any], column: str, who: str, rate: int = JUDGE_RATE) -> list:
    """The batch's `column` as float32 mono arrays at `rate`; None stays None (no audio: no score),
    an Unscored (a completion the codec could not decode) stays, an empty array becomes Unscored."""
    if column not in columns:
        raise KeyError(f"{who}: no column {column!r} in the batch (columns: {', '.join(sorted(columns))}); "
                       f"TTS batches carry the generated waveforms in 'audio'")
    sample_rate = columns.get("sample_rate")
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"{who}: the batch's 'sample_rate' is {sample_rate!r}; send the waveforms' rate in Hz")
    out, resampled = [], {}  # the n samples of one prompt share one reference array: resample it once
    for i, audio in enumerate(columns[column]):
        if audio is None or isinstance(audio, Unscored):  # Unscored: the decoder already said why
            out.append(audio)
            continue
        if id(audio) not in resampled:
            x = np.asarray(audio, dtype=np.float32)
            if x.ndim != 1:
                raise ValueError(f"{who}: {column}[{i}] has shape {x.shape}; expected a mono 1-D waveform")
            if x.size and sample_rate != rate:
                x = soxr.resample(x, sample_rate, rate, quality="HQ").astype(np.float32)
            resampled[id(audio)] = x
        x = resampled[id(audio)]
        out.append(x if x.size else Unscored(f"{column}[{i}] is empty"))
    return out


def frame_levels_db(audio: np.ndarray, rate: int, frame_seconds: float = 0.02) -> np.ndarray:
    """RMS level of each non-overlapping frame, in dB relative to full scale."""
    n = max(int(rate * frame_seconds), 1)
    frames = audio[: len(audio) // n * n].reshape(-1, n) if len(audio) >= n else audio[None, :]
    return 20 * np.log10(np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1)) + 1e-10)


class SpeechSanityReward:
    """reward = -(sum of 0/1 penalties): cheap, model-free checks on what model rewards could be gamed with.

    "bad_rate" (text characters per audio second outside `chars_per_second`), "silent" (over `max_silence`
    of frames `silence_db` below the loudest, or all below -80 dBFS), "clipped" (over `max_clipped` of
    samples at or above `clip_level`); each is a component, as are the measured values.
    """

    def __init__(
        self,
        chars_per_second: tuple[float, float] = (5.0, 30.0),  # accepted speaking rate, letters/digits per second
        max_silence: float = 0.6,  # fraction of 20 ms frames that may be silent
        silence_db: float = 40.0,  # a frame this many dB below the loudest frame is silent
        clip_level: float = 0.999,  # |sample| at or above this is clipped
        max_clipped: float = 0.001,  # fraction of samples that may be clipped
        penalty: float = 1.0,  # per failed check
        text_column: str = "text",
        audio_column: str = "audio",
    ):
        low, high = chars_per_second
        if not 0 < low < high:
            raise ValueError(f"speech_sanity: chars_per_second={chars_per_second}; need 0 < low < high")
        if not (0 < max_silence <= 1 and 0 <= max_clipped <= 1 and 0 < clip_level <= 1 and silence_db > 0):
            raise ValueError(f"speech_sanity: max_silence ({max_silence}) must be in (0, 1], max_clipped "
                             f"({max_clipped}) in [0, 1], clip_level ({clip_level}) in (0, 1], silence_db "
                             f"({silence_db}) > 0")
        self.chars_per_second, self.max_silence, self.silence_db = (low, high), max_silence, silence_db
        self.clip_level, self.max_clipped, self.penalty = clip_level, max_clipped, penalty
        self.text_column, self.audio_column = text_column, audio_column

    def __call__(self, completions: list[str], **columns: Any) -> dict[str, list[Optional[float]]]:
        # the rate is judged on the audio as sent: resampling must not smooth away clipping
        audios = waveforms(columns, self.audio_column, "speech_sanity", rate=columns.get("sample_rate"))
        texts = columns.get(self.text_column) or [None] * len(audios)
        keys = ("reward", "bad_rate", "silent", "clipped", "chars_per_second", "silence_fraction", "clipped_fraction")
        out: dict[str, list] = {k: [] for k in keys}
        for audio, text in zip(audios, texts, strict=True):
            scores = (dict.fromkeys(keys, audio) if audio is None or isinstance(audio, Unscored)
                      else self._score_one(audio, text, columns["sample_rate"]))
            for k in keys:
                out[k].append(scores[k])
        return out

    def _score_one(self, audio: np.ndarray, text: Optional[str], rate: int) -> dict[str, float]:
        levels = frame_levels_db(audio, rate)
        silence = 1.0 if levels.max() < -80 else float(np.mean(levels < levels.max() - self.silence_db))
        clipped = float(np.mean(np.abs(audio) >= self.clip_level))
        # letters and digits only: punctuation and spaces are not spoken at a rate
        chars = sum(c.isalnum() for c in normalize_text(text)) if text else None
        cps = chars / (len(audio) / rate) if chars else math.nan
        bad_rate = float(chars is not None and not self.chars_per_second[0] <= cps <= self.chars_per_second[1])
        silent, clip = float(silence > self.max_silence), float(clipped > self.max_clipped)
        return {"reward": -self.penalty * (bad_rate + silent + clip), "bad_rate": bad_rate, "silent": silent,
                "clipped": clip, "chars_per_second": cps, "silence_fraction": silence, "clipped_fraction": clipped}
