"""Pairwise annotation tasks from a run's samples, or from any set of audio samples with their prompts.

Sources (a run's saved rollouts and eval wavs, or a samples JSONL) and strategies are in
docs/annotation.md. `reward_gap` pairs where an automatic reward is most sure (gap >= `min_gap`), so
annotators check it; `random` is unbiased; `checkpoints` asks whether training made a prompt better.
"""
from __future__ import annotations

import json
import logging
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from speechrl.data.annotation import STRATEGIES
from speechrl.data.annotation.batches import PairSpec, Side
from speechrl.data.audio import BadExample, load_audio

log = logging.getLogger(__name__)

TAGS = {  # the reason tags offered with each mode's pairs
    "tts": ["intelligibility", "naturalness", "pronunciation", "voice match", "artifacts", "pace"],
    "realtime": ["in character", "persona facts", "boundaries", "speaking style", "answers the user",
                 "naturalness"],
}
INSTRUCTIONS = {
    "tts": "Both clips should say the text. Which one says it better: every word clear and right, "
           "natural, in the reference voice if there is one?",
    "realtime": "Both clips reply to the user as the persona. Which reply stays in character, "
                "contradicts nothing the persona is, keeps its style and answers the user?",
}


class TaskSourceError(ValueError):
    """A samples source that cannot become tasks: names the file (and line) and what to do."""


@dataclass
class Sample:
    """One sample, its audio not yet read: a file (`audio_path`) or codec ids, decoded by `load_pair_audio`."""

    group: str  # samples answering the same prompt share it
    text: str
    source: str = ""  # the checkpoint or step it came from
    reward: Optional[float] = None
    meta: dict = field(default_factory=dict)  # kept with the pair (where it came from, its rewards)
    context: dict = field(default_factory=dict)  # shown with the pair: {"persona": ..., "history": ...}
    audio_path: Optional[str] = None
    voice_path: Optional[str] = None
    codec_ids: Optional[list[int]] = None
    voice_codec_ids: Optional[list[int]] = None


# --- reading samples ------------------------------------------------------------------------------
def read_samples(source: str | Path, *, steps: Optional[list[int]] = None) -> tuple[list[Sample], str]:
    """The samples in `source` (a run directory or a samples JSONL file), and the mode they are for."""
    path = Path(source).expanduser()
    if path.is_file():
        return _read_samples_file(path), "tts"
    if not path.is_dir():
        raise TaskSourceError(f"{path}: no such run directory or samples file")
    mode = _run_mode(path)
    samples = _read_rollouts(path, steps, mode) + _read_eval_samples(path, steps)
    if not samples:
        raise TaskSourceError(
            f"{path}: no samples found: expected rollouts/step-N.jsonl (RL runs with run.save_rollouts_every > 0) "
            "or samples/step-N/*.wav (TTS evaluations); or pass a samples .jsonl file")
    return samples, mode


def _run_mode(run_dir: Path) -> str:
    recipe = run_dir / "recipe.yaml"
    if not recipe.is_file():
        return "tts"
    import yaml

    return (yaml.safe_load(recipe.read_text()) or {}).get("mode", "tts")


def _read_samples_file(path: Path) -> list[Sample]:
    from speechrl.data.manifest import ManifestError, jsonl_rows

    samples, base = [], path.absolute().parent
    try:
        rows = list(jsonl_rows(path))
    except ManifestError as e:
        raise TaskSourceError(str(e)) from None
    for where, row in rows:
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise TaskSourceError(f"{where}: field 'text' is missing or empty; give the prompt the audio answers")
        audio_path = row.get("audio")
        if not isinstance(audio_path, str) or not audio_path:
            raise TaskSourceError(f"{where}: field 'audio' must be an audio file path, got {audio_path!r}")
        reward = row.get("reward")
        if reward is not None and (isinstance(reward, bool) or not isinstance(reward, (int, float))):
            raise TaskSourceError(f"{where}: field 'reward' must be a number, got {reward!r}")
        samples.append(Sample(group=str(row.get("group", text)), text=text, source=str(row.get("source", "")),
                              reward=None if reward is None else float(reward),
                              meta={"file": where, **{k: row[k] for k in ("id", "reward") if k in row}},
                              context={k: row[k] for k in ("persona", "history") if row.get(k) is not None},
                              audio_path=str(base / audio_path),
                              voice_path=str(base / row["voice"]) if row.get("voice") else None))
    if not samples:
        raise TaskSourceError(f"{path}: no samples in the file")
    return samples


def _step_of(path: Path) -> int:
    match = re.search(r"step-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def _read_rollouts(run_dir: Path, steps: Optional[list[int]], mode: str) -> list[Sample]:
    sample_of = _realtime_sample if mode == "realtime" else _tts_sample
    samples = []
    for path in sorted((run_dir / "rollouts").glob("step-*.jsonl"), key=_step_of):
        step = _step_of(path)
        if steps and step not in steps:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            row = json.loads(line)
            if "codec_ids" not in row:  # an ASR run's rollouts are transcripts: nothing to listen to
                continue
            samples.append(sample_of(row, f"{path}:{n}", step))
    return samples


def _tts_sample(row: dict, where: str, step: int) -> Sample:
    return Sample(
        group=f"step-{step}/prompt-{row['prompt_index']}", text=row["text"], source=f"step-{step}",
        reward=row.get("reward"), codec_ids=row["codec_ids"], voice_codec_ids=row.get("voice_codec_ids"),
        meta={"file": where, "step": step, "reward": row.get("reward"), "components": row.get("components", {}),
              "id": row.get("id")})


def _realtime_sample(row: dict, where: str, step: int) -> Sample:
    """A spoken reply to one turn: the prompt shown is the user's turn, the card and the dialogue so far
    its context; the meta keeps what an export hands the realtime readers (export.py, `_realtime`)."""
    for name, kind in (("user_text", str), ("persona", str), ("history", list)):
        if not isinstance(row.get(name), kind):
            raise TaskSourceError(f"{where}: field {name!r} is missing or not a {kind.__name__}, which a realtime "
                                  "run's rollout row holds (the turn's context); is recipe.yaml's mode right?")
    # rollouts saved before `reply_text` was: the engine's decoding skips the codec tokens (special
    # tokens), so it is the text part
    reply_text = row["reply_text"] if "reply_text" in row else (row.get("completion") or "").strip()
    return Sample(
        group=f"step-{step}/prompt-{row['prompt_index']}", text=row["user_text"], source=f"step-{step}",
        reward=row.get("reward"), codec_ids=row["codec_ids"],
        meta={"file": where, "step": step, "reward": row.get("reward"), "components": row.get("components", {}),
              "id": row.get("id"), "reply_text": reply_text, "codec_ids": row["codec_ids"],
              "completion_ids": row.get("completion_ids"), "user_audio": row.get("user_audio")},
        context={"persona": row["persona"], "history": row["history"], "user_text": row["user_text"]})


def _read_eval_samples(run_dir: Path, steps: Optional[list[int]]) -> list[Sample]:
    samples = []
    for folder in sorted((run_dir / "samples").glob("step-*"), key=_step_of):
        step = _step_of(folder)
        if (steps and step not in steps) or not (folder / "texts.txt").is_file():
            continue
        for line in (folder / "texts.txt").read_text().splitlines():
            name, _, text = line.partition("\t")
            samples.append(Sample(group=f"eval/{name}", text=text, source=f"step-{step}",
                                  meta={"file": str(folder / f"{name}.wav"), "step": step},
                                  audio_path=str(folder / f"{name}.wav")))
    return samples


# --- pairing --------------------------------------------------------------------------------------
def choose_pairs(samples: list[Sample], strategy: str, *, min_gap: float = 0.0, pairs_per_group: int = 1,
                 sources: Optional[tuple[str, str]] = None, max_pairs: Optional[int] = None,
                 seed: int = 0) -> list[tuple[Sample, Sample]]:
    """Pairs of samples of the same group, by `strategy` (see the module docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pairing strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    rng = random.Random(seed)
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.group if strategy != "checkpoints" else _checkpoint_group(s)].append(s)
    if strategy == "checkpoints":
        sources = sources or _first_and_last(samples)
    chosen: list[tuple[Sample, Sample]] = []
    for key in sorted(groups):
        group = groups[key]
        if strategy == "reward_gap":
            scored = [s for s in group if s.reward is not None]
            gaps = sorted(((abs(a.reward - b.reward), i, j) for (i, a), (j, b) in combinations(enumerate(scored), 2)
                           if abs(a.reward - b.reward) >= min_gap and _differ(a, b)), reverse=True)
            used: set[int] = set()
            for _, i, j in gaps:  # largest gaps first, each sample in at most one pair
                if len([p for p in chosen if p[0].group == key]) >= pairs_per_group:
                    break
                if i not in used and j not in used:
                    hi, lo = (scored[i], scored[j]) if scored[i].reward >= scored[j].reward else (scored[j], scored[i])
                    chosen.append((hi, lo))
                    used |= {i, j}
        elif strategy == "random":
            candidates = [(a, b) for a, b in combinations(group, 2) if _differ(a, b)]
            chosen += rng.sample(candidates, min(pairs_per_group, len(candidates)))
        else:
            first = [s for s in group if s.source == sources[0]]
            second = [s for s in group if s.source == sources[1]]
            if first and second:
                chosen.append((first[0], second[0]))
    if max_pairs is not None and len(chosen) > max_pairs:
        chosen = rng.sample(chosen, max_pairs)
    return chosen


def _checkpoint_group(s: Sample) -> str:
    """Rollout groups are per step; across checkpoints, the same text is the same prompt, and a
    realtime reply's the same turn of the same dialogue (its id: user turns repeat across personas)."""
    if s.group.startswith("eval/") or not s.group.startswith("step-"):
        return s.group
    return s.meta["id"] if "reply_text" in s.meta and s.meta.get("id") else s.text


def _first_and_last(samples: list[Sample]) -> tuple[str, str]:
    found = sorted({s.source for s in samples}, key=lambda name: (_step_of(Path(name)), name))
    if len(found) < 2:
        raise TaskSourceError(f"pairing across checkpoints needs samples from two sources; found {found or 'none'}")
    return found[0], found[-1]


def _differ(a: Sample, b: Sample) -> bool:
    if a.codec_ids is not None and b.codec_ids is not None:
        return a.codec_ids != b.codec_ids
    return a.audio_path != b.audio_path


# --- audio ----------------------------------------------------------------------------------------
def load_pair_audio(pairs: list[tuple[Sample, Sample]], run_dir: Optional[Path] = None,
                    ) -> tuple[list[PairSpec], list[str]]:
    """PairSpecs with decoded audio; a pair whose audio cannot be read or decoded is dropped (its
    reason in the second list), so one bad clip never costs the batch."""
    codec = None
    specs, dropped = [], []
    for n, (a, b) in enumerate(tqdm(pairs, desc="decoding pairs", unit="pair", disable=len(pairs) < 20)):
        try:
            if codec is None and (a.codec_ids is not None or b.codec_ids is not None):
                codec = run_codec(run_dir)
            sides = [_side(s, codec) for s in (a, b)]
            voice = _voice(a, codec)
        except (BadExample, ValueError, IndexError) as e:
            dropped.append(f"{a.meta.get('file')} / {b.meta.get('file')}: {e}")
            continue
        key = f"{a.group}:{n}"
        specs.append(PairSpec(key=key, text=a.text, first=sides[0], second=sides[1], context=a.context,
                              voice=voice))
    for reason in dropped:
        log.warning("pair left out: %s", reason)
    return specs, dropped


def _side(s: Sample, codec) -> Side:
    meta = {**s.meta, "source": s.source}
    if s.codec_ids is not None:
        if not s.codec_ids:
            raise ValueError("the sample has no codec ids (it ended at once)")
        return Side(codec.decode(np.asarray(s.codec_ids)), codec.sample_rate, meta)
    import soundfile as sf

    try:
        native = sf.info(s.audio_path).samplerate
    except Exception as e:  # noqa: BLE001 - any unreadable header is one bad clip
        raise BadExample(s.audio_path, f"cannot read audio header ({type(e).__name__}: {e})") from None
    rate = min(max(native, 8000), 48000)  # the clip's own rate, within what browsers play
    return Side(load_audio(s.audio_path, sample_rate=rate, max_seconds=60), rate, meta)


def _voice(s: Sample, codec) -> Optional[Side]:
    if s.voice_codec_ids:
        return Side(codec.decode(np.asarray(s.voice_codec_ids)), codec.sample_rate)
    if s.voice_path:
        return Side(load_audio(s.voice_path, sample_rate=16000, max_seconds=30), 16000)
    return None


def run_codec(run_dir: Optional[Path]):
    """The codec a run's recipe names (rollout codec ids only mean something with it)."""
    if run_dir is None or not (run_dir / "recipe.yaml").is_file():
        raise TaskSourceError(f"{run_dir}: samples hold codec ids, but there is no recipe.yaml to rebuild the "
                              "run's codec from")
    from speechrl.rlhf.core.config import load_recipe
    from speechrl.rollouts.codec import CodecSpec

    return CodecSpec.from_recipe(load_recipe(str(run_dir / "recipe.yaml"))).build()
