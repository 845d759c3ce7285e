"""A judge ASR from our own backbone, and the embedded one `tts_intelligibility` uses by default.

pocketsphinx cannot hear the embedded espeak-ng corpus (WER 0.93 on clean clips), so the judge is the
tiny backbone's ASR mode fine-tuned on it, clean and round-tripped through the TTS codec (what a TTS
policy sounds like when it says the words right). Built once into `<cache_dir>/judges/asr-<key>`,
beside `judge_scores.json` (its held-out CER/WER on clean and on round-tripped clips).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from tqdm import tqdm

from speechrl.rewards.speech import JUDGE_RATE
from speechrl.rlhf.core.config import EmbeddedCodecConfig, SyntheticCorpusConfig

log = logging.getLogger(__name__)

BACKBONE_ARCHITECTURE = "Qwen2AudioForConditionalGeneration"
SCORES = "judge_scores.json"  # written last into the judge's directory: its presence means "built"
JUDGE_VERSION = 2  # bump when the build below or the codec's decoding changes, so cached judges are rebuilt


def is_backbone_dir(path: str | Path) -> bool:
    """True for a speechrl / Qwen2-Audio backbone directory (its config.json names the architecture)."""
    config = Path(path).expanduser() / "config.json"
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError) as e:
        raise ValueError(f"{config}: cannot read it as a model config ({e})") from e
    return BACKBONE_ARCHITECTURE in architectures


class BackboneAsrJudge:
    """Greedy transcripts from a backbone directory's ASR mode (`rollouts.local.greedy_transcribe`)."""

    def __init__(self, path: str | Path, device: str = "auto", batch_size: int = 32):
        import torch

        from speechrl.rlhf.model.backbone import load_backbone

        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        backbone = load_backbone(path, device=device)
        self.model, self.processor, self.batch_size = backbone.model, backbone.processor, batch_size
        self.path, self.rate = backbone.path, backbone.sample_rate
        self.window = self.processor.feature_extractor.n_samples

    def transcribe(self, audio: np.ndarray) -> str:
        return self.transcribe_batch([audio])[0]

    def transcribe_batch(self, audios: list[np.ndarray]) -> list[str]:
        """`audios` at 16 kHz. A clip longer than the backbone's audio window is cut to the window:
        the encoder sees only that much, and a rambling TTS sample must still get a transcript."""
        from speechrl.rollouts.local import greedy_transcribe

        if self.rate != JUDGE_RATE:
            import soxr

            audios = [soxr.resample(a, JUDGE_RATE, self.rate).astype(np.float32) for a in audios]
        clips = [np.asarray(a, dtype=np.float32)[: self.window] for a in audios]
        return greedy_transcribe(self.model, self.processor, clips, batch_size=self.batch_size)


@dataclass(frozen=True)
class JudgeBuild:
    """What the embedded judge is built from and how. The defaults are the embedded TTS setup
    (recipes/tts: its one-voice corpus, its codec); a recipe passes its own `data.synthetic`
    and `tts.embedded_codec`."""

    corpus: SyntheticCorpusConfig = field(default_factory=lambda: SyntheticCorpusConfig(
        voices=["en-us"], rates=[175], pitches=[50]))  # the TTS corpus (data.synthetic)
    codec: EmbeddedCodecConfig = field(default_factory=EmbeddedCodecConfig)  # the TTS codec (tts.embedded_codec)
    # SFT optimizer steps on clean + round-tripped train clips; held-out CER clean / round-tripped was
    # 0.447 / 0.600 after 600 steps, 0.389 / 0.483 after 1200 (docs/results.md, TTS demo)
    steps: int = 1200
    lr: float = 2e-3  # SFT peak learning rate
    batch_size: int = 16  # SFT clips per step
    seed: int = 0  # SFT seed (weights' init is the tiny backbone's, shared with the recipes)


def judge_build(corpus: Any = None) -> JudgeBuild:
    """The embedded judge's build for `tts_intelligibility`'s `corpus` kwarg: the corpus the judge
    learns to hear, a `data.synthetic` block (the TTS recipes pass `${data.synthetic}`, so a recipe
    with other sentences or voices gets a judge trained on them); None = the TTS demo's corpus."""
    if corpus is None:
        return JudgeBuild()
    if isinstance(corpus, SyntheticCorpusConfig):
        return JudgeBuild(corpus=corpus)
    if not isinstance(corpus, Mapping):
        raise TypeError(f"tts_intelligibility: corpus={corpus!r}; give a data.synthetic block (a mapping) "
                        "or leave it out for the TTS demo's corpus")
    known = [f.name for f in fields(SyntheticCorpusConfig)]
    unknown = sorted(set(corpus) - set(known))
    if unknown:
        raise ValueError(f"tts_intelligibility: corpus has unknown field(s) {', '.join(unknown)}; it takes "
                         f"data.synthetic's fields: {', '.join(known)}")
    return JudgeBuild(corpus=SyntheticCorpusConfig(**corpus))


def embedded_judge(cache_dir: str | Path = "~/.cache/speechrl", build: JudgeBuild = JudgeBuild()) -> Path:
    """The embedded judge's directory, which must have been built (by a trainer, before reward
    workers start: `speechrl.rlhf.trainers.judges.ensure_embedded_judge`). Training it is a
    trainer's job, so rewards only read it."""
    path = judge_dir(cache_dir, build)
    if not (path / SCORES).is_file():
        raise FileNotFoundError(f"tts_intelligibility: the embedded ASR judge is not built in {path}; build it "
                                "once with `speechrl build-judges --recipe tts/grpo` (every TTS recipe also "
                                "builds it before its reward workers start)")
    return path


def judge_dir(cache_dir: str | Path, build: JudgeBuild = JudgeBuild()) -> Path:
    """Where `build`'s judge lives, built or not: keyed by `build` and by what the codec's decoder
    outputs, so a changed corpus, codec or decoder gets a judge of its own."""
    fields = asdict(build)
    fields["codec"] = {k: v for k, v in fields["codec"].items()  # settings added later count only when set
                       if k not in _ADDED_CODEC_FIELDS or v != _ADDED_CODEC_FIELDS[k]}
    key = _sha1(JUDGE_VERSION, fields, codec_fingerprint(_codec(cache_dir, build)))
    return Path(cache_dir).expanduser() / "judges" / f"asr-{key}"


# EmbeddedCodecConfig fields added after judges were first cached, at their defaults: left out of the
# judge's key, so judges built before keep their directories
_ADDED_CODEC_FIELDS = {"smooth_frames": 1, "fit_on": "espeak", "fit_clips": 300}


def _codec(cache_dir: str | Path, build: JudgeBuild):
    from speechrl.rollouts.mel_codec import default_codec, embedded_settings

    config, fit_on, _ = embedded_settings(asdict(build.codec))
    if fit_on != "espeak":
        raise ValueError("the embedded judge's codec is fit on espeak-ng speech (tts.embedded_codec.fit_on: espeak); "
                         "with fit_on: corpus judge with Whisper (tts_intelligibility asr: whisper-tiny.en)")
    return default_codec(cache_dir, config)


def codec_fingerprint(codec) -> str:
    """A hash of the codec's class, configuration and learned arrays, plus JUDGE_VERSION (bump it
    when decoding changes): round trips made by another codec are never reused.

    Not a hash of what the codec makes of a probe signal: float rounding depends on the thread
    count, so a Ray reward worker (one thread) and the driver computed different keys and the
    worker built a second judge."""
    import hashlib

    parts = [type(codec).__name__, repr(getattr(codec, "config", None))]
    for name in ("codebooks", "mean_logmel"):
        array = getattr(codec, name, None)
        if array is not None:
            parts.append(hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest())
    return _sha1(*parts)


def round_trip_corpus(train: Path, heldout: Path, codec) -> tuple[Path, Path]:
    """Both splits encoded and decoded by `codec`, as wavs and manifests in `codec-<key>/` beside them.

    Ids get a "-codec" suffix: SFT caches prompt ids by example id, and a round-tripped clip's
    length (hence its audio placeholder count) differs from the clean one's.
    """
    from dataclasses import replace

    from speechrl.data.audio import write_wav
    from speechrl.data.manifest import SpeechDataset, read_manifest, write_manifest

    out = train.parent / f"codec-{codec_fingerprint(codec)}"
    manifests = out / "train.jsonl", out / "heldout.jsonl"
    if all(m.is_file() for m in manifests):
        return manifests
    for source, target in zip((train, heldout), manifests):
        examples = []
        for ex, audio in tqdm(SpeechDataset(read_manifest(source), JUDGE_RATE).items, unit="clip",
                              desc=f"codec round trip ({source.stem})", disable=None):
            wav = out / "audio" / Path(ex.audio).name
            if not wav.is_file():  # resumable: write_wav is atomic
                write_wav(wav, codec.decode(codec.encode(audio, JUDGE_RATE)), JUDGE_RATE)
            examples.append(replace(ex, id=ex.id + "-codec", audio=str(wav)))
        write_manifest(target, examples)
    return manifests


def _sha1(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
