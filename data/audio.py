"""Decode and validate one clip; write one clip.

Everything that reads audio for training goes through `load_audio`, so a broken file becomes a
`BadExample` with its path and a reason instead of a crash (or worse, a silent garbage batch)
hours into a run. soundfile decodes, soxr resamples: torchaudio does not work on our CPU stack.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

# Native rates outside this range are corrupt headers, not audio (awful.wav claims 1,092,676 Hz).
MIN_NATIVE_RATE = 4_000
MAX_NATIVE_RATE = 192_000
# Up to 7.1 surround is downmixed; more channels is a multitrack recording, not one utterance.
MAX_CHANNELS = 8
# Peak below this (about -80 dBFS) means the clip holds no speech at all.
SILENCE_PEAK = 1e-4


class BadExample(Exception):
    """An example that cannot be used; `source` is its path (or id), `reason` says why."""

    def __init__(self, source: str | Path, reason: str):
        super().__init__(str(source), reason)  # args kept so the exception pickles across workers
        self.source = str(source)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


def load_audio(
    source: str | Path | bytes,
    sample_rate: int = 16000,
    *,
    min_seconds: float = 0.2,
    max_seconds: float | None = None,
    name: str | None = None,
) -> np.ndarray:
    """Decode `source` (a path or encoded bytes) to float32 mono at `sample_rate`.

    Raises BadExample (source = `name`, else the path, else "<bytes>") when the file is unreadable,
    has an absurd rate or channel count, is too short/long, holds non-finite samples or is silent.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise BadExample(label, "file not found")
    try:
        with sf.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else source) as f:
            native_rate, channels, frames = f.samplerate, f.channels, f.frames
            # Check the header before reading samples: a corrupt one can claim gigabytes.
            _check_header(label, native_rate, channels, frames, min_seconds, max_seconds)
            audio = f.read(dtype="float32", always_2d=True)
    except BadExample:
        raise
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError, OSError, EOFError) as e:
        raise BadExample(label, f"cannot decode audio ({type(e).__name__}: {e})") from e

    if len(audio) == 0:
        raise BadExample(label, "no samples")
    audio = audio.mean(axis=1, dtype=np.float32) if channels > 1 else audio[:, 0]
    if not np.isfinite(audio).all():
        raise BadExample(label, "non-finite samples (NaN or inf)")
    peak = float(np.abs(audio).max())
    if peak < SILENCE_PEAK:
        raise BadExample(label, f"silent (peak amplitude {peak:.2e} < {SILENCE_PEAK:g})")
    if native_rate != sample_rate:
        audio = soxr.resample(audio, native_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(audio, dtype=np.float32)


def _check_header(label, native_rate, channels, frames, min_seconds, max_seconds) -> None:
    if not MIN_NATIVE_RATE <= native_rate <= MAX_NATIVE_RATE:
        raise BadExample(
            label,
            f"sample rate {native_rate} Hz outside [{MIN_NATIVE_RATE}, {MAX_NATIVE_RATE}] Hz "
            "(corrupt header?)",
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise BadExample(label, f"{channels} channels (expected 1 to {MAX_CHANNELS})")
    seconds = frames / native_rate
    if seconds < min_seconds:
        raise BadExample(label, f"too short: {seconds:.3f} s < min_seconds={min_seconds}")
    if max_seconds is not None and seconds > max_seconds:
        raise BadExample(label, f"too long: {seconds:.2f} s > max_seconds={max_seconds}")


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Write float audio in [-1, 1] as 16-bit PCM mono WAV, atomically.

    Atomic (temp file + rename) so an interrupted corpus build never leaves a truncated wav that
    a resumed build would mistake for a finished one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    audio = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    fd, tmp = tempfile.mkstemp(suffix=".wav.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            sf.write(f, audio, sample_rate, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
