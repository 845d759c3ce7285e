"""The one interface between waveforms and the policy's audio tokens.

Multi-codebook (residual VQ) codecs flatten frames in time order with codebook k's units offset by
k * codebook_size, so one flat id says which codebook and which unit (2 x 512: u00, 512+u01, u10, ...).
`CodecTokens` maps them onto the backbone's `<|a0|>..` block. Waveforms are decoded only where a
reward needs them, so the codec stays out of the policy.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import numpy as np
import soxr

from speechrl.rlhf.model.backbone import CODEC_END, CODEC_TOKEN_RE


class AudioCodec(Protocol):
    sample_rate: int  # rate of decode()'s output, and the rate encode() resamples to
    codebook_size: int  # units per codebook
    num_codebooks: int  # ids per frame
    frame_rate: float  # frames per second (ids per second = frame_rate * num_codebooks)

    def encode(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        """Mono float waveform at `sample_rate` -> int64 codec-local ids, flattened as above."""
        ...

    def decode(self, ids: Sequence[int]) -> np.ndarray:
        """Codec-local ids -> float32 mono waveform at `self.sample_rate`."""
        ...


def vocab_size(codec: AudioCodec) -> int:
    return codec.codebook_size * codec.num_codebooks


def prepare_waveform(waveform: np.ndarray, sample_rate: int, target_rate: int, who: str) -> np.ndarray:
    """Validate an encode() input and resample it to the codec's rate; `who` names the codec."""
    audio = np.asarray(waveform)
    if audio.ndim != 1:
        raise ValueError(f"{who}: waveform has shape {audio.shape}; pass one mono 1-D array (average the channels)")
    if audio.size == 0:
        raise ValueError(f"{who}: waveform is empty; there is nothing to encode")
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"{who}: waveform dtype is {audio.dtype}; pass float samples in [-1, 1] "
                         "(divide int16 PCM by 32768)")
    if not np.isfinite(audio).all():
        raise ValueError(f"{who}: waveform holds NaN or inf samples")
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"{who}: sample_rate={sample_rate!r}; pass the waveform's rate in Hz as a positive int")
    audio = audio.astype(np.float32)
    if sample_rate != target_rate:
        audio = soxr.resample(audio, sample_rate, target_rate, quality="HQ").astype(np.float32)
    return audio


def flatten_codes(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """(num_codebooks, frames) units -> flat codec-local ids, frame by frame, codebook k offset by k * size."""
    codes = np.asarray(codes, dtype=np.int64)
    offsets = np.arange(codes.shape[0], dtype=np.int64)[:, None] * codebook_size
    return (codes + offsets).T.reshape(-1)


def unflatten_ids(ids: Sequence[int], num_codebooks: int, codebook_size: int, who: str) -> np.ndarray:
    """Flat codec-local ids -> (num_codebooks, frames) units; the inverse of `flatten_codes`.

    Rejects, naming the first bad position, ids that are not whole frames or that sit in the wrong
    codebook's range (a policy that emits a codebook-1 id where codebook 0 belongs).
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise ValueError(f"{who}: no codec ids to decode")
    if ids.size % num_codebooks:
        raise ValueError(f"{who}: {ids.size} ids is not a whole number of frames of {num_codebooks} codebooks")
    frames = ids.reshape(-1, num_codebooks).T
    offsets = np.arange(num_codebooks, dtype=np.int64)[:, None] * codebook_size
    units = frames - offsets
    bad = np.argwhere((units < 0) | (units >= codebook_size))
    if len(bad):
        k, t = (int(v) for v in bad[0])
        raise ValueError(
            f"{who}: id {int(frames[k, t])} at position {t * num_codebooks + k} is outside codebook {k}'s range "
            f"[{k * codebook_size}, {(k + 1) * codebook_size}) ({len(bad)} such ids); ids must come from "
            "this codec's encode() or from a policy constrained to its frame layout")
    return units


class CodecTokens:
    """Codec-local ids <-> the backbone's codec-token ids (`<|a0|>` is codec id 0)."""

    def __init__(self, tokenizer, codec: AudioCodec):
        vocab = tokenizer.get_vocab()
        block = sorted((int(m.group(1)), i) for t, i in vocab.items() if (m := CODEC_TOKEN_RE.match(t)))
        if [n for n, _ in block] != list(range(len(block))):
            raise ValueError("the tokenizer's codec tokens are not a contiguous block <|a0|>..<|aN-1|>")
        needed = vocab_size(codec)
        if needed > len(block):
            raise ValueError(
                f"{type(codec).__name__} needs {needed} codec tokens ({codec.num_codebooks} codebooks x "
                f"{codec.codebook_size}) but the backbone's tokenizer has {len(block)}; build the backbone with "
                f"model.tiny.num_codec_tokens >= {needed}, or use fewer codebooks")
        self.token_ids = np.array([i for _, i in block[:needed]], dtype=np.int64)
        self.end_id = tokenizer.convert_tokens_to_ids(CODEC_END)
        self._codec_id = {int(t): c for c, t in enumerate(self.token_ids)}

    def to_backbone(self, ids: Sequence[int]) -> list[int]:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.token_ids)):
            raise ValueError(f"codec ids must be in [0, {len(self.token_ids)}); got {ids.min()}..{ids.max()}")
        return self.token_ids[ids].tolist()

    def from_backbone(self, token_ids: Sequence[int]) -> list[int]:
        """A completion's token ids up to `<|codec_end|>` (exclusive) -> codec-local ids."""
        out = []
        for pos, tok in enumerate(token_ids):
            if tok == self.end_id:
                break
            if int(tok) not in self._codec_id:
                raise ValueError(f"token id {tok} at position {pos} is not one of this codec's "
                                 f"{len(self.token_ids)} codec tokens")
            out.append(self._codec_id[int(tok)])
        return out


def load_codec(spec: str | Path, **kwargs) -> AudioCodec:
    """A codec from a directory: a transformers codec (config.json: Mimi, DAC, EnCodec) or a saved
    `MelUnitCodec` (mel_codec.json). kwargs go to the codec's loader."""
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        from speechrl.rollouts.hf_codec import HfCodec
        return HfCodec(path, **kwargs)
    from speechrl.rollouts.mel_codec import MelUnitCodec
    if (path / MelUnitCodec.FILE).is_file():
        return MelUnitCodec.load(path, **kwargs)
    raise FileNotFoundError(f"{path}: neither a transformers codec directory (config.json) nor a saved "
                            f"MelUnitCodec ({MelUnitCodec.FILE}); build one with MelUnitCodec.fit(...).save(dir) "
                            "or save_pretrained a Mimi/DAC/EnCodec model there")


@dataclass(frozen=True)
class CodecSpec:
    """Where a recipe's codec comes from, small enough to send to reward workers (which build it).

    `path`: a codec directory (see `load_codec`); None = the embedded MelUnitCodec with `embedded`
    as its MelCodecConfig overrides, fit once into `cache_dir`.
    """

    path: Optional[str] = None
    cache_dir: str = "~/.cache/speechrl"
    embedded: tuple[tuple[str, Any], ...] = ()
    fit_manifest: Optional[str] = None  # fit_on: corpus: the training manifest the codebooks are fit on

    @classmethod
    def from_recipe(cls, cfg, fit_manifest: Optional[str] = None) -> "CodecSpec":
        """The recipe's codec; `fit_manifest` is its training manifest where `tts.embedded_codec.fit_on`
        is corpus (rlhf.modes.assets.codec_spec passes it)."""
        from dataclasses import asdict

        return cls(cfg.tts.codec, cfg.run.cache_dir, tuple(sorted(asdict(cfg.tts.embedded_codec).items())),
                   fit_manifest)

    def build(self) -> AudioCodec:
        if self.path:
            return load_codec(self.path)
        from speechrl.rollouts.mel_codec import corpus_codec, default_codec, embedded_settings

        config, fit_on, clips = embedded_settings(dict(self.embedded))
        if fit_on == "corpus":
            if not self.fit_manifest:
                raise ValueError("tts.embedded_codec.fit_on=corpus needs the training manifest to fit on")
            return corpus_codec(self.cache_dir, config, self.fit_manifest, clips)
        return default_codec(self.cache_dir, config)


def decode_column(codec: AudioCodec, codec_ids: Sequence[Sequence[int]]) -> list:
    """Each completion's codec ids -> its waveform at codec.sample_rate; a completion that cannot
    be decoded (no audio tokens, ids out of the codec's layout) gets an `Unscored` saying why, so
    its sample goes unscored instead of stopping the step."""
    from speechrl.rewards.api import Unscored

    out = []
    for i, ids in enumerate(codec_ids):
        if len(ids) == 0:
            out.append(Unscored("the completion has no audio tokens"))
            continue
        try:
            out.append(codec.decode(ids))
        except ValueError as e:
            out.append(Unscored(f"codec could not decode sample {i}: {e}"))
    return out
