"""A judge ASR from our own backbone, and the embedded one `tts_intelligibility` uses by default.

pocketsphinx cannot hear the embedded TTS corpus (espeak-ng command sentences: WER 0.93 on clean
clips, 0.61 even held to the 33-word grammar). The embedded judge is the tiny backbone's ASR mode
fine-tuned on that corpus twice over: the clean clips, and the same clips round-tripped through
the TTS codec (Griffin-Lim vocoded, whispery), which is what a TTS policy's audio sounds like when
it says the words right. It is built once into `<cache_dir>/judges/asr-<key>` (the key hashes
`JudgeBuild`), beside `judge_scores.json`: its held-out CER/WER on clean and on round-tripped clips.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from speechrl.rewards.speech import JUDGE_RATE
from speechrl.rlhf.config import EmbeddedCodecConfig, SyntheticCorpusConfig

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
    """Greedy transcripts from a backbone directory's ASR mode (`rlhf.evaluate.greedy_transcribe`)."""

    def __init__(self, path: str | Path, device: str = "auto", batch_size: int = 32):
        import torch

        from speechrl.rlhf.backbone import load_backbone

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
        from speechrl.rlhf.evaluate import greedy_transcribe

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
    steps: int = 600  # SFT optimizer steps on clean + round-tripped train clips
    lr: float = 2e-3  # SFT peak learning rate
    batch_size: int = 16  # SFT clips per step
    seed: int = 0  # SFT seed (weights' init is the tiny backbone's, shared with the recipes)


def ensure_embedded_judge(cache_dir: str | Path = "~/.cache/speechrl", build: JudgeBuild = JudgeBuild()) -> Path:
    """The embedded judge's backbone directory (`judge_dir`), built on first use and reused.

    Concurrent callers (reward workers starting together) queue on one lock per cache: the first
    builds (and fits the codec if need be), the others then find its judge. A build killed
    outright leaves a `.partial-*` directory that nothing reads.
    """
    judges = Path(cache_dir).expanduser() / "judges"
    judges.mkdir(parents=True, exist_ok=True)
    with open(judges / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = judge_dir(cache_dir, build)
        if not (path / SCORES).is_file():
            _build_judge(Path(cache_dir).expanduser(), build, path)
    return path


def judge_dir(cache_dir: str | Path, build: JudgeBuild = JudgeBuild()) -> Path:
    """Where `build`'s judge lives, built or not: keyed by `build` and by what the codec's decoder
    outputs, so a changed corpus, codec or decoder gets a judge of its own."""
    key = _sha1(JUDGE_VERSION, asdict(build), codec_fingerprint(_codec(cache_dir, build)))
    return Path(cache_dir).expanduser() / "judges" / f"asr-{key}"


def _codec(cache_dir: str | Path, build: JudgeBuild):
    from speechrl.rollouts.mel_codec import MelCodecConfig, default_codec

    return default_codec(cache_dir, MelCodecConfig(**asdict(build.codec)))


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


def _build_judge(cache_dir: Path, build: JudgeBuild, path: Path) -> None:
    from speechrl.data.manifest import read_manifest, write_manifest
    from speechrl.rlhf.config import load_recipe
    from speechrl.rlhf.sft import run_sft

    log.info("building the embedded ASR judge into %s (once; a few CPU minutes)", path)
    start = time.perf_counter()
    (clean_train, clean_heldout), (coded_train, coded_heldout) = judge_corpus(cache_dir, build)
    mixed = write_manifest(coded_train.with_name("judge-train.jsonl"),
                           read_manifest(clean_train) + read_manifest(coded_train))
    # the run directory is scratch beside the judge: only its final weights are kept
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=path.name + ".partial-") as scratch:
        cfg = load_recipe("asr/sft", [
            f"run.cache_dir={cache_dir}", f"run.output_dir={scratch}", "run.name=sft", f"seed={build.seed}",
            f"data.train={mixed}", f"data.eval={coded_heldout}", "data.max_eval_examples=16",
            f"train.steps={build.steps}", f"train.lr={build.lr}", f"train.batch_size={build.batch_size}",
            f"train.eval_every={build.steps}", f"train.checkpoint_every={build.steps}"])
        final = Path(run_sft(cfg)["final weights"])
        scores = judge_scores(final, clean_heldout, coded_heldout)
        scores.update(build=asdict(build), build_seconds=round(time.perf_counter() - start, 1))
        (final / SCORES).write_text(json.dumps(scores, indent=1))
        final.rename(path)  # atomic: the judge appears whole or not at all
    log.info("embedded ASR judge ready in %.0f s: held-out CER clean %.3f, round-tripped %.3f",
             scores["build_seconds"], scores["clean"]["cer"], scores["round_trip"]["cer"])


def judge_corpus(cache_dir: str | Path, build: JudgeBuild = JudgeBuild()) -> tuple[tuple[Path, Path], tuple[Path, Path]]:
    """The judge's data, built once: ((train, held-out) of the TTS corpus, the same round-tripped).

    The corpus gets a directory of its own (`corpora/tts-<key>`); `corpora/synthetic-*` are the
    ASR recipes'. Its split is the TTS recipe's: `build_corpus` splits by its parameters alone.
    """
    from speechrl.rlhf.assets import build_synthetic_corpus
    from speechrl.rlhf.config import DataConfig, RecipeConfig

    cfg = RecipeConfig(data=DataConfig(synthetic=build.corpus, sample_rate=JUDGE_RATE))
    clean = build_synthetic_corpus(cfg, Path(cache_dir).expanduser() / "corpora" / f"tts-{_sha1(asdict(build.corpus))}")
    return clean, round_trip_corpus(*clean, _codec(cache_dir, build))


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


def judge_scores(path: Path, clean_heldout: Path, coded_heldout: Path) -> dict:
    """Mean held-out CER/WER of the judge at `path` on clean and on round-tripped clips."""
    from speechrl.data.manifest import SpeechDataset, read_manifest
    from speechrl.rlhf.backbone import load_backbone
    from speechrl.rlhf.evaluate import evaluate_asr

    backbone = load_backbone(path)
    scores = {}
    for name, manifest in (("clean", clean_heldout), ("round_trip", coded_heldout)):
        data = SpeechDataset(read_manifest(manifest), JUDGE_RATE)
        result = evaluate_asr(backbone.model, backbone.processor, data, max_examples=len(data), max_new_tokens=48)
        scores[name] = {"cer": result["eval/cer"], "wer": result["eval/wer"], "clips": len(data)}
    return scores


def _sha1(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
