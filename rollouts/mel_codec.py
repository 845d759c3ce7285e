"""The embedded codec: k-means units over spectral-envelope frames, decoded with Griffin-Lim.

No download, no GPU: fit on a corpus in seconds. Frames are mean-normalized per clip (channel and
loudness spend no units) and cut to the first `n_cepstra` DCT coefficients (the envelope carries the
words; pitch harmonics would take most units and say little), then residual VQ. Decoded speech is
whispery and loses the speaker but keeps the words (benchmarks/codec_roundtrip.py measures how well).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from speechrl.rlhf.core.fingerprint import fingerprint
from speechrl.rollouts.codec import flatten_codes, prepare_waveform, unflatten_ids

log = logging.getLogger(__name__)

# Phonetically balanced English (Harvard sentences, IEEE 1969, public domain): what the default
# codec is fit on, spoken by espeak-ng in several voices.
FIT_SENTENCES = (
    "The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.", "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.", "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.", "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.", "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.", "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.", "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.", "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.", "The girl at the booth sold fifty bonds.",
)
FIT_VOICES = (("en", "en-us", "en-gb-x-rp"), (140, 175, 210), (35, 50, 65))  # voices, rates (wpm), pitches


@dataclass(frozen=True, repr=False)
class MelCodecConfig:
    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 256  # 16 ms frames: 62.5 frames/s
    n_mels: int = 80
    n_cepstra: int = 24  # DCT coefficients of the log-mel frame kept (the envelope)
    codebook_size: int = 512
    num_codebooks: int = 2  # residual VQ stages; codebook_size * num_codebooks ids in all
    griffin_lim_iters: int = 32
    level: float = 0.05  # RMS the input is scaled to before analysis, and the output's RMS
    max_fit_frames: int = 40_000  # frames k-means sees (a random subset of a larger corpus)
    seed: int = 0
    # Decode averages each frame's envelope with its neighbours over a binomial window this many
    # frames wide (3: weights 1, 2, 1). A unit's quantization error is independent from frame to
    # frame while the envelope moves slowly, so the average cuts error more than speech: round-trip
    # WER on real recordings 0.92 -> 0.52 at 2 x 512, 1.06 -> 0.71 at 1 x 1024 hop 320 (originals
    # 0.30; benchmarks/codec_roundtrip.py); 5 frames did no better. 1: none, as before.
    smooth_frames: int = 1

    def __repr__(self) -> str:
        return f"MelCodecConfig({', '.join(f'{k}={v!r}' for k, v in recorded_fields(self).items())})"


# Fields added after codecs were first cached and judged: at their defaults they are left out of
# repr (which rewards/asr_judge.py hashes into judge keys), of the saved json and of the cache key,
# so codecs fit before keep their keys, their codebooks and their judges.
ADDED_FIELDS = ("smooth_frames",)
# Fields only decode reads: never in the cache key, so setting them reuses a cached codec's
# codebooks (the same ids) rather than fitting new ones.
DECODE_ONLY_FIELDS = ("smooth_frames",)


def recorded_fields(config: MelCodecConfig) -> dict:
    """`config` as a dict, less the ADDED_FIELDS left at their defaults."""
    default = MelCodecConfig()
    return {k: v for k, v in asdict(config).items() if k not in ADDED_FIELDS or v != getattr(default, k)}


class MelUnitCodec:
    """See the module docstring. Build with `fit`, or `load` a saved one."""

    FILE = "mel_codec.json"
    ARRAYS = "mel_codec.npz"

    def __init__(self, config: MelCodecConfig, codebooks: np.ndarray, mean_logmel: np.ndarray):
        expected = (config.num_codebooks, config.codebook_size, config.n_cepstra)
        if codebooks.shape != expected or mean_logmel.shape != (config.n_mels,):
            raise ValueError(f"MelUnitCodec: codebooks {codebooks.shape} / mean {mean_logmel.shape} do not match "
                             f"the config ({expected} / ({config.n_mels},)); refit or re-save the codec")
        if config.smooth_frames < 1 or config.smooth_frames % 2 == 0:
            raise ValueError(f"MelCodecConfig.smooth_frames={config.smooth_frames}; pass an odd number of "
                             "frames >= 1 (1 = no smoothing, 3 = weights 1, 2, 1)")
        import librosa

        self.config = config
        self.codebooks = codebooks.astype(np.float32)
        self.mean_logmel = mean_logmel.astype(np.float32)
        self.sample_rate, self.codebook_size = config.sample_rate, config.codebook_size
        self.num_codebooks = config.num_codebooks
        self.frame_rate = config.sample_rate / config.hop_length
        self._mel = librosa.filters.mel(sr=config.sample_rate, n_fft=config.n_fft, n_mels=config.n_mels)
        # mel -> linear power by the filterbank's pseudo-inverse, not librosa's mel_to_stft: that
        # solves a non-negative least squares per clip, 4x slower end to end at the same round-trip
        # WER (benchmarks/codec_roundtrip.py), and decoding runs once per sampled completion
        self._mel_inverse = np.linalg.pinv(self._mel)
        n = config.smooth_frames
        self._smoothing = np.array([math.comb(n - 1, k) for k in range(n)], np.float32) / 2 ** (n - 1)

    # --- analysis ------------------------------------------------------------------------------
    def _logmel(self, audio: np.ndarray) -> np.ndarray:
        import librosa

        c = self.config
        audio = audio * (c.level / max(float(np.sqrt(np.mean(audio ** 2))), 1e-8))
        power = np.abs(librosa.stft(audio, n_fft=c.n_fft, hop_length=c.hop_length)) ** 2
        return np.log(self._mel @ power + 1e-6).T  # (frames, n_mels)

    def _envelope(self, audio: np.ndarray) -> np.ndarray:
        from scipy.fft import dct

        logmel = self._logmel(audio)
        return dct(logmel - logmel.mean(axis=0), norm="ortho", axis=1)[:, :self.config.n_cepstra]

    # --- the codec -----------------------------------------------------------------------------
    def encode(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        audio = prepare_waveform(waveform, sample_rate, self.sample_rate, "MelUnitCodec.encode")
        residual = self._envelope(audio)
        codes = []
        for book in self.codebooks:
            # squared distance to every centroid without a (frames, units, dims) temporary
            dist = (book ** 2).sum(1)[None, :] - 2.0 * residual @ book.T
            units = dist.argmin(axis=1)
            codes.append(units)
            residual = residual - book[units]
        return flatten_codes(np.stack(codes), self.codebook_size)

    def decode(self, ids: Sequence[int]) -> np.ndarray:
        import librosa
        from scipy.fft import idct
        from scipy.ndimage import convolve1d

        c = self.config
        units = unflatten_ids(ids, self.num_codebooks, self.codebook_size, "MelUnitCodec.decode")
        envelope = sum(book[u] for book, u in zip(self.codebooks, units))  # (frames, n_cepstra)
        # Griffin-Lim's centered inverse STFT gives hop_length * (frames - 1) samples: a single frame
        # would decode to no audio at all (a one-token completion), so it is held for two frames
        if len(envelope) == 1:
            envelope = np.repeat(envelope, 2, axis=0)
        envelope = convolve1d(envelope, self._smoothing, axis=0, mode="nearest")
        full = np.pad(envelope, ((0, 0), (0, c.n_mels - c.n_cepstra)))
        mel_power = np.exp(idct(full, norm="ortho", axis=1) + self.mean_logmel).T
        magnitude = np.sqrt(np.maximum(self._mel_inverse @ mel_power, 0.0))
        audio = librosa.griffinlim(magnitude, n_iter=c.griffin_lim_iters, hop_length=c.hop_length,
                                   n_fft=c.n_fft, random_state=c.seed)
        audio *= c.level / max(float(np.sqrt(np.mean(audio ** 2))), 1e-8)
        return np.clip(audio, -1.0, 1.0).astype(np.float32)

    # --- building, saving ----------------------------------------------------------------------
    @classmethod
    def fit(cls, waveforms: Sequence[np.ndarray], sample_rate: int,
            config: MelCodecConfig = MelCodecConfig()) -> "MelUnitCodec":
        """Fit the codebooks on `waveforms` (float mono at `sample_rate`): residual k-means."""
        from sklearn.cluster import MiniBatchKMeans  # scikit-learn comes with librosa

        if not waveforms:
            raise ValueError("MelUnitCodec.fit: no waveforms to fit on")
        probe = cls(config, np.zeros((config.num_codebooks, config.codebook_size, config.n_cepstra)),
                    np.zeros(config.n_mels))
        clips = [prepare_waveform(w, sample_rate, config.sample_rate, f"MelUnitCodec.fit: waveform {i}")
                 for i, w in enumerate(waveforms)]
        mean_logmel = np.concatenate([probe._logmel(a) for a in clips]).mean(axis=0)
        frames = np.concatenate([probe._envelope(a) for a in clips])
        if len(frames) < config.codebook_size:
            raise ValueError(f"MelUnitCodec.fit: {len(frames)} frames for {config.codebook_size} units per "
                             "codebook; fit on more audio or lower codebook_size")
        rng = np.random.default_rng(config.seed)
        residual = frames[rng.permutation(len(frames))[:config.max_fit_frames]]
        books = []
        for k in range(config.num_codebooks):
            km = MiniBatchKMeans(config.codebook_size, n_init=1, batch_size=4096, random_state=config.seed + k)
            km.fit(residual)
            books.append(km.cluster_centers_)
            residual = residual - km.cluster_centers_[km.labels_]
        return cls(config, np.stack(books), mean_logmel)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(directory / self.ARRAYS, codebooks=self.codebooks, mean_logmel=self.mean_logmel)
        (directory / self.FILE).write_text(json.dumps(recorded_fields(self.config), indent=1))  # last: marks it whole
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "MelUnitCodec":
        directory = Path(directory).expanduser()
        if not (directory / cls.FILE).is_file():
            raise FileNotFoundError(f"{directory}: no {cls.FILE}; not a saved MelUnitCodec")
        config = MelCodecConfig(**json.loads((directory / cls.FILE).read_text()))
        with np.load(directory / cls.ARRAYS) as arrays:
            return cls(config, arrays["codebooks"], arrays["mean_logmel"])


def _fit_fields(config: MelCodecConfig) -> dict:
    """The settings that decide the codebooks (what a cache key holds)."""
    return {k: v for k, v in recorded_fields(config).items() if k not in DECODE_ONLY_FIELDS}


def cache_directory(cache_dir: str | Path, config: MelCodecConfig) -> Path:
    """Where `default_codec` keeps the codec it fits for `config`: named by a hash of the fit."""
    from speechrl.data.synth import BUILDER_VERSION  # the fit clips' synthesis

    key = hashlib.sha1(json.dumps([_fit_fields(config), FIT_SENTENCES, FIT_VOICES, BUILDER_VERSION]).encode())
    return Path(cache_dir).expanduser() / "codecs" / f"mel-{key.hexdigest()[:12]}"


def _fit_once(directory: Path, config: MelCodecConfig, clips: Callable[[], list], what: str) -> MelUnitCodec:
    """The codec saved in `directory` (with `config`'s decode-only settings), else fit on `clips()` and saved."""
    if (directory / MelUnitCodec.FILE).is_file():
        saved = MelUnitCodec.load(directory)  # its decode-only fields may differ from `config`'s
        return MelUnitCodec(config, saved.codebooks, saved.mean_logmel)
    codec = MelUnitCodec.fit(clips(), config.sample_rate, config)
    codec.save(directory)
    log.info("embedded codec fit on %s into %s, fingerprint %s", what, directory,
             fingerprint(directory / MelUnitCodec.FILE))
    return codec


def corpus_codec(cache_dir: str | Path, config: MelCodecConfig, manifest: str | Path, clips: int) -> MelUnitCodec:
    """The embedded codec fit on a corpus' own speech, the first `clips` clips of `manifest` (the
    target voice's spectra rather than espeak-ng's), once; cached under a key of the fit settings and
    the manifest's bytes."""
    from speechrl.data.audio import load_audio
    from speechrl.data.manifest import read_manifest

    manifest = Path(manifest).expanduser()
    key = hashlib.sha1(json.dumps([_fit_fields(config), clips]).encode() + manifest.read_bytes()).hexdigest()[:12]
    return _fit_once(Path(cache_dir).expanduser() / "codecs" / f"mel-corpus-{key}", config,
                     lambda: [load_audio(r.audio, config.sample_rate, min_seconds=0.0)
                              for r in read_manifest(manifest)[:clips]], f"{clips} clips of {manifest}")


def default_codec(cache_dir: str | Path, config: MelCodecConfig = MelCodecConfig()) -> MelUnitCodec:
    """The embedded codec, fit once on espeak-ng readings of FIT_SENTENCES and cached in `cache_dir`."""
    from speechrl.data.synth import synthesize

    voices, rates, pitches = FIT_VOICES
    return _fit_once(cache_directory(cache_dir, config), config,
                     lambda: [synthesize(text, voice, rate, pitch, config.sample_rate) for voice in voices
                              for rate in rates for pitch in pitches for text in FIT_SENTENCES],
                     "espeak-ng readings of the Harvard sentences")


def embedded_settings(settings: dict) -> tuple[MelCodecConfig, str, int]:
    """`tts.embedded_codec` as (the MelCodecConfig, fit_on, fit_clips): where the codebooks are fit is
    not a MelCodecConfig field."""
    settings = dict(settings)
    fit_on, clips = settings.pop("fit_on", "espeak"), settings.pop("fit_clips", 0)
    return MelCodecConfig(**settings), fit_on, clips
