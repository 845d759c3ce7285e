"""Building the embedded judges that rewards read: the TTS judge ASR (our tiny backbone fine-tuned
by the SFT trainer, rewards/asr_judge.py), the trained persona judge (persona_judge_build.py) and the
persona judge's tiny LM. A trainer builds them
before its reward workers start, on every core (a one-thread reward actor took ~20 min)."""
from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Callable

from speechrl.rlhf.core.build_once import build_once
from speechrl.rlhf.core.fingerprint import fingerprint
from speechrl.rewards.asr_judge import (SCORES, JudgeBuild, _codec, _sha1, judge_build, judge_dir,
                                        round_trip_corpus)
from speechrl.rewards.speech import JUDGE_RATE
from speechrl.rlhf.core.config import RecipeConfig

log = logging.getLogger(__name__)


def judge_builds(cfg: RecipeConfig) -> list[Callable[[], Path]]:
    """The builds of the embedded judges the recipe's rewards read (`tts_intelligibility
    asr=embedded`'s ASR, `persona_judge model=trained`'s SmolLM2 judge or `model=tiny`'s LM), each a
    call that builds once."""
    from speechrl.rewards.judge_backends import ensure_tiny_judge
    from speechrl.rewards.learned import default_cache_dir
    from speechrl.rewards.trained_judge import PersonaJudgeBuild
    from speechrl.rlhf.trainers.persona_judge_build import ensure_persona_judge

    builds = []
    for spec in cfg.rewards:
        if spec.name == "tts_intelligibility" and spec.kwargs.get("asr") == "embedded":
            builds.append(partial(ensure_embedded_judge, spec.kwargs.get("cache_dir", cfg.run.cache_dir),
                                  judge_build(spec.kwargs.get("corpus"))))
        if spec.name == "persona_judge" and spec.kwargs.get("model") == "tiny" and spec.kwargs.get("cache_dir"):
            builds.append(partial(ensure_tiny_judge, spec.kwargs["cache_dir"]))
        if spec.name == "persona_judge" and spec.kwargs.get("model") == "trained" and not spec.kwargs.get("endpoint"):
            # where the reward will look for it (persona_judge: its cache_dir, else the default cache)
            builds.append(partial(ensure_persona_judge, spec.kwargs.get("cache_dir") or default_cache_dir(),
                                  PersonaJudgeBuild.from_kwargs(spec.kwargs.get("build"))))
    return builds


def needs_judges(cfg: RecipeConfig) -> bool:
    return bool(judge_builds(cfg))


def prebuild_judges(cfg: RecipeConfig) -> list[Path]:
    return [build() for build in judge_builds(cfg)]


def ensure_embedded_judge(cache_dir: str | Path = "~/.cache/speechrl", build: JudgeBuild = JudgeBuild()) -> Path:
    """The embedded judge's backbone directory (`judge_dir`), built on first use and reused.

    Concurrent callers (reward workers starting together) queue on one lock per cache: the first
    builds (and fits the codec if need be), the others then find its judge. A build killed
    outright leaves a `.partial-*` directory that nothing reads.
    """
    path = judge_dir(cache_dir, build)
    return build_once(path, lambda p: (p / SCORES).is_file(),
                      lambda: _build_judge(Path(cache_dir).expanduser(), build, path))


def _build_judge(cache_dir: Path, build: JudgeBuild, path: Path) -> None:
    from speechrl.data.manifest import read_manifest, write_manifest
    from speechrl.rlhf.core.config import load_recipe
    from speechrl.rlhf.trainers.sft import run_sft

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
            f"train.eval_every={build.steps}", f"train.checkpoint_every={build.steps}",
            # the corpus' own sentences: the tiny backbone's tokenizer learns them (none: the command grammar)
            *([f"data.synthetic.texts={build.corpus.texts}", f"data.synthetic.num_texts={build.corpus.num_texts}",
               f"data.synthetic.seed={build.corpus.seed}"] if build.corpus.texts else [])])
        final = Path(run_sft(cfg)["final weights"])
        scores = judge_scores(final, clean_heldout, coded_heldout)
        scores.update(build=asdict(build), build_seconds=round(time.perf_counter() - start, 1),
                      fingerprint=fingerprint(final / "model.safetensors"))
        (final / SCORES).write_text(json.dumps(scores, indent=1))
        final.rename(path)  # atomic: the judge appears whole or not at all
    log.info("embedded ASR judge ready in %.0f s: held-out CER clean %.3f, round-tripped %.3f; weights "
             "fingerprint %s", scores["build_seconds"], scores["clean"]["cer"], scores["round_trip"]["cer"],
             scores["fingerprint"])


def judge_corpus(cache_dir: str | Path, build: JudgeBuild = JudgeBuild()) -> tuple[tuple[Path, Path], tuple[Path, Path]]:
    """The judge's data, built once: ((train, held-out) of the TTS corpus, the same round-tripped).

    The corpus gets a directory of its own (`corpora/tts-<key>`); `corpora/synthetic-*` are the
    ASR recipes'. Its split is the TTS recipe's: `build_corpus` splits by its parameters alone.
    """
    from speechrl.rlhf.core.config import DataConfig, RunConfig
    from speechrl.rlhf.modes.assets import build_synthetic_corpus

    cfg = RecipeConfig(data=DataConfig(synthetic=build.corpus, sample_rate=JUDGE_RATE),
                       run=RunConfig(cache_dir=str(cache_dir)))
    clean = build_synthetic_corpus(cfg, Path(cache_dir).expanduser() / "corpora" / f"tts-{_sha1(asdict(build.corpus))}")
    return clean, round_trip_corpus(*clean, _codec(cache_dir, build))


def judge_scores(path: Path, clean_heldout: Path, coded_heldout: Path) -> dict:
    """Mean held-out CER/WER of the judge at `path` on clean and on round-tripped clips."""
    from speechrl.data.manifest import SpeechDataset, read_manifest
    from speechrl.rlhf.model.backbone import load_backbone
    from speechrl.rlhf.modes.asr import evaluate_asr

    backbone = load_backbone(path)
    scores = {}
    for name, manifest in (("clean", clean_heldout), ("round_trip", coded_heldout)):
        data = SpeechDataset(read_manifest(manifest), JUDGE_RATE)
        result = evaluate_asr(backbone.model, backbone.processor, data, max_examples=len(data), max_new_tokens=48)
        scores[name] = {"cer": result["eval/cer"], "wer": result["eval/wer"], "clips": len(data)}
    return scores
