"""What a recipe runs on: the backbone directory and the speech data, built on first use.

The embedded default needs nothing downloaded: a tiny random backbone and a synthetic
spoken corpus are built into `run.cache_dir` once and reused.
"""
from __future__ import annotations

import logging
from pathlib import Path

from speechrl.data.manifest import SpeechDataset, read_manifest
from speechrl.data.synth import build_corpus, command_sentences, composed_commands, read_text_list
from speechrl.rlhf.model.backbone import default_tiny_dir, ensure_tiny_backbone
from speechrl.rlhf.core.config import COMPOSED_TEXTS, GENERATED_TEXTS, RecipeConfig

log = logging.getLogger(__name__)


def corpus_texts(cfg: RecipeConfig) -> list[str] | None:
    s = cfg.data.synthetic
    if s.texts == GENERATED_TEXTS:  # sentences SmolLM2 writes once into the cache (modes/sentences.py)
        from speechrl.rlhf.modes.sentences import ensure_sentences

        return read_text_list(ensure_sentences(cfg.run.cache_dir, s.num_texts, s.seed))
    if s.texts == COMPOSED_TEXTS:
        return composed_commands(s.num_texts, s.seed)
    return read_text_list(s.texts) if s.texts else None


def backbone_path(cfg: RecipeConfig) -> Path:
    """run.init_from, else model.path, else model.pretrained, else the embedded tiny backbone (each
    built once; a mode with a tokenizer of its own, or `model.tiny.texts: all_modes`, builds its own:
    Mode.backbone_path)."""
    if cfg.run.init_from:
        path = Path(cfg.run.init_from).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"run.init_from={path} is not a backbone directory (no config.json); "
                                    "point it at a run's final/ or checkpoints/step-N/model/")
        return path
    if cfg.model.path:
        return Path(cfg.model.path).expanduser()
    if cfg.model.pretrained:
        from speechrl.rlhf.model.pretrained.backbone import ensure_pretrained  # transformers: import when used

        return ensure_pretrained(cfg.model.pretrained, cfg.run.cache_dir)
    return ensure_tiny_backbone(cfg.run.cache_dir, cfg.model.tiny, lambda: tokenizer_texts(cfg), cfg.data.sample_rate)


def shared_tokenizer_texts(cfg: RecipeConfig) -> list[str]:
    """`model.tiny.texts: all_modes`: every registered mode's tokenizer texts (but those of modes that
    do not share it: `Mode.shares_backbone`) under its shipped base recipe (`<mode>/base`), so one backbone is built whichever mode's recipe asks for it first."""
    from speechrl.rlhf.core.config import load_recipe
    from speechrl.rlhf.core.registry import MODES

    texts = []
    for name in sorted(MODES.names()):
        if not MODES.get(name).shares_backbone:
            continue
        base = load_recipe(f"{name}/base", [f"run.cache_dir={cfg.run.cache_dir}", f"seed={cfg.seed}",
                                            f"model.tiny.seed={cfg.model.tiny.seed}"])
        texts += MODES.get(name)(base).tokenizer_texts()
    return texts


def texts_key(texts: list[str]) -> str:
    """A short hash of tokenizer texts: the cache name of a backbone built from them carries it."""
    import hashlib

    return hashlib.sha1("\n".join(texts).encode("utf-8")).hexdigest()[:10]


def tiny_backbone(cfg: RecipeConfig, texts: list[str], suffix: str) -> Path:
    """The embedded tiny backbone with a tokenizer learnt from `texts` (a mode's own), cached
    beside the default one under a name ending in `suffix`."""
    plain = default_tiny_dir(cfg.run.cache_dir, cfg.model.tiny)
    return ensure_tiny_backbone(cfg.run.cache_dir, cfg.model.tiny, lambda: texts, cfg.data.sample_rate,
                                path=plain.with_name(f"{plain.name}-{suffix}"))


def tokenizer_texts(cfg: RecipeConfig) -> list[str]:
    """What a tiny backbone's tokenizer learns from: the corpus' own texts, else the command grammar."""
    return corpus_texts(cfg) or command_sentences(5000, seed=cfg.model.tiny.seed)


def corpus_dir(cfg: RecipeConfig) -> Path:
    """One directory per corpus setting, so an ASR and a TTS recipe never rebuild each other's corpus
    (the default setting keeps its historical name)."""
    import hashlib
    import json
    from dataclasses import asdict

    from speechrl.rlhf.core.config import SyntheticCorpusConfig

    s = cfg.data.synthetic
    name = f"synthetic-{s.seed}"
    if s != SyntheticCorpusConfig(seed=s.seed):
        name += "-" + hashlib.sha1(json.dumps(asdict(s), sort_keys=True).encode()).hexdigest()[:10]
    return Path(cfg.run.cache_dir).expanduser() / "corpora" / name


def manifests(cfg: RecipeConfig) -> tuple[Path, Path]:
    """(train, eval) manifests: the recipe's, or the synthetic corpus' split."""
    if cfg.data.train and cfg.data.eval:
        return Path(cfg.data.train).expanduser(), Path(cfg.data.eval).expanduser()
    train, heldout = build_synthetic_corpus(cfg, corpus_dir(cfg))
    return (Path(cfg.data.train).expanduser() if cfg.data.train else train,
            Path(cfg.data.eval).expanduser() if cfg.data.eval else heldout)


def codec_spec(cfg: RecipeConfig):
    """The recipe's codec (rollouts.codec.CodecSpec); with `tts.embedded_codec.fit_on: corpus`, fit on
    the recipe's training manifest (the corpus is built here when it is not yet)."""
    from speechrl.rollouts.codec import CodecSpec

    corpus_fit = not cfg.tts.codec and cfg.tts.embedded_codec.fit_on == "corpus"
    return CodecSpec.from_recipe(cfg, str(manifests(cfg)[0]) if corpus_fit else None)


def build_synthetic_corpus(cfg: RecipeConfig, out_dir: Path) -> tuple[Path, Path]:
    """The recipe's `data.synthetic` corpus in `out_dir` (reused when already built); (train, held-out)."""
    s = cfg.data.synthetic
    return build_corpus(out_dir, num_utterances=s.num_utterances, heldout_fraction=s.heldout_fraction,
                        voices=tuple(s.voices), rates=tuple(s.rates), pitches=tuple(s.pitches),
                        texts=corpus_texts(cfg), sample_rate=cfg.data.sample_rate, seed=s.seed)


def load_datasets(cfg: RecipeConfig, max_audio_seconds: float):
    """(train, held-out) speech datasets of (example, audio) pairs from the recipe's manifests
    (the synthetic corpus by default); clips outside the length limits are bad examples."""
    train_path, eval_path = manifests(cfg)
    max_seconds = cfg.data.max_seconds or max_audio_seconds
    if max_seconds > max_audio_seconds:
        raise ValueError(f"data.max_seconds={max_seconds} exceeds the backbone's audio window "
                         f"({max_audio_seconds} s); longer clips would be truncated")
    kw = dict(sample_rate=cfg.data.sample_rate, min_seconds=cfg.data.min_seconds, max_seconds=max_seconds,
              on_bad=cfg.data.on_bad_example)
    train, held = SpeechDataset(read_manifest(train_path), **kw), SpeechDataset(read_manifest(eval_path), **kw)
    for name, ds in (("train", train), ("eval", held)):
        if len(ds) == 0:
            raise ValueError(f"{name} data ({train_path if name == 'train' else eval_path}) has no usable "
                             f"examples: {ds.summary()}")
    return train, held
