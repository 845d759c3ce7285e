"""Held-out evaluation of the TTS mode: synthesize the held-out texts, score them, keep samples.

The same prompts every time, each synthesized `tts.eval_repeats` times at `tts.eval_temperature`
(the rollouts' own temperature by default: greedy decoding of codec tokens is not what RL trains, and
its output jumps between near-ties, ±0.1 CER from one evaluation to the next); each reward
component's mean over all of them is logged as `eval/<reward>/<component>`. The first
`tts.eval_samples` go to `samples/step-<N>/<id>.wav` and TensorBoard, every completion's scores to
`samples/step-<N>/scores.jsonl`; `samples/reference/` holds the corpus recordings and their codec
round trip (the best the policy could do with this codec).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from speechrl.data.audio import write_wav
from speechrl.rlhf.core.intervals import write_example_scores
from speechrl.rlhf.modes.base import first, safe_name

log = logging.getLogger(__name__)

SCORES = "scores.jsonl"  # per completion, beside an evaluation's samples


class TtsEvaluation:
    """The held-out prompts of a TTS run, how to score their completions, and where samples go."""

    def __init__(self, cfg, task, eval_set, run_dir: Path, logger):
        self.cfg, self.task, self.logger = cfg, task, logger
        self.repeats = cfg.tts.eval_repeats if cfg.tts.eval_temperature > 0 else 1  # greedy: one is all
        self.items = first(eval_set, cfg.data.max_eval_examples)
        self.prompt_ids = [task.prompt_ids(ex.text, task.voice(ex, eval_set)) for ex, _ in self.items]
        self.prompts = [task.render(ex.text, task.voice(ex, eval_set)) for ex, _ in self.items]
        self.samples_dir = Path(run_dir) / "samples"
        self.referenced = False
        self._write_references()

    def batch(self, completions: list[list[int]], repeats: Optional[int] = None) -> dict:
        """The reward batch for these completions (codec ids; the reward side decodes them), `repeats`
        consecutive completions per held-out text."""
        exs = [ex for ex, _ in self.items for _ in range(repeats or self.repeats)]
        return {"completions": [""] * len(completions), "completion_ids": completions, "mode": "tts",
                "codec_ids": [self.task.codec_ids(c) for c in completions],
                "id": [ex.id for ex in exs], "text": [ex.text for ex in exs], "speaker": [ex.speaker for ex in exs]}

    def reference(self, score: Callable) -> dict:
        """What the rewards give the held-out recordings themselves, once a run: `eval_reference/clean/...`
        (the judge's own error on the targets) and `eval_reference/codec/...` (through the codec: the
        best the policy can reach), beside the policy's `eval/...`."""
        codec, rate = self.task.codec, self.cfg.data.sample_rate
        clean = [audio for _, audio in self.items]
        completions = [self.task.encode(audio, rate) + [self.task.tokens.end_id] for audio in clean]
        metrics = {}
        for name, audios, audio_rate in (("clean", clean, rate),
                                         ("codec", [codec.decode(self.task.codec_ids(c)) for c in completions],
                                          codec.sample_rate)):
            # with `audio` in the batch the reward side scores these waveforms instead of decoding codec ids
            result = score({**self.batch(completions, repeats=1), "audio": audios, "sample_rate": audio_rate})
            metrics.update({k.replace("rewards/", f"eval_reference/{name}/", 1): v for k, v in result.metrics().items()})
        return metrics

    def evaluate(self, step: int, completions: list[list[int]], score: Callable) -> dict:
        """Score completions of the held-out prompts (`repeats` per prompt, in prompt order) with
        `score(batch) -> ScoreResult`; write each prompt's first as a sample."""
        if len(completions) != len(self.items) * self.repeats:
            raise ValueError(f"TTS evaluation: {len(completions)} completions for {len(self.items)} held-out texts "
                             f"x {self.repeats} repeats")
        result = score(self.batch(completions))
        metrics = {k.replace("rewards/", "eval/", 1): v for k, v in result.metrics().items()}
        if not self.referenced:  # the first evaluation of the process
            metrics.update(self.reference(score))
            self.referenced = True
        end = self.task.tokens.end_id
        metrics["eval/ended"] = float(np.mean([bool(c) and c[-1] == end for c in completions]))
        metrics["eval/audio_seconds"] = float(np.mean([
            len(self.task.codec_ids(c)) / (self.task.codec.frame_rate * self.task.codec.num_codebooks)
            for c in completions]))
        self.write_samples(step, completions[:: self.repeats])
        self.write_scores(step, result)
        return metrics

    def write_scores(self, step: int, result) -> None:
        """Every completion's scores, one JSON line each ({"id", "text", "repeat", "eval/<reward>/<component>"},
        null where unscored): which text the judge heard worst, and what `speechrl eval`'s paired
        intervals resample."""
        exs = [ex for ex, _ in self.items for _ in range(self.repeats)]
        write_example_scores(self.samples_dir / f"step-{step}" / SCORES, (
            {"id": ex.id, "text": ex.text, "repeat": i % self.repeats,
             **{f"eval/{key}": float(values[i]) if bool(result.valid[i]) else None
                for key, values in result.components.items()}}
            for i, ex in enumerate(exs)))

    def write_samples(self, step: int, completions: list[list[int]]) -> None:
        codec = self.task.codec
        folder = self.samples_dir / f"step-{step}"
        for (ex, _), ids in list(zip(self.items, completions))[: self.cfg.tts.eval_samples]:
            codec_ids = self.task.codec_ids(ids)
            audio = codec.decode(codec_ids) if codec_ids else np.zeros(codec.sample_rate // 10, np.float32)
            write_wav(folder / f"{safe_name(ex.id)}.wav", audio, codec.sample_rate)
            self.logger.tb.add_audio(f"samples/{safe_name(ex.id)}", torch.from_numpy(audio)[None], step,
                                     sample_rate=codec.sample_rate)
        (folder / "texts.txt").write_text("".join(f"{safe_name(ex.id)}\t{ex.text}\n"
                                                  for ex, _ in self.items[: self.cfg.tts.eval_samples]))

    def _write_references(self) -> None:
        folder = self.samples_dir / "reference"
        if folder.is_dir():
            return
        codec, rate = self.task.codec, self.cfg.data.sample_rate
        for ex, audio in self.items[: self.cfg.tts.eval_samples]:
            write_wav(folder / f"{safe_name(ex.id)}.wav", audio, rate)
            write_wav(folder / f"{safe_name(ex.id)}.codec.wav", codec.decode(codec.encode(audio, rate)), codec.sample_rate)
