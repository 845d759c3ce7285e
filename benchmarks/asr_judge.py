"""The embedded ASR judge against pocketsphinx, on the embedded TTS corpus' held-out clips.

Builds the judge the way `tts_intelligibility(asr="embedded")` does (`ensure_embedded_judge`, the
default `JudgeBuild`), into a fresh temporary cache unless --cache-dir names one, and times it.
Then both judges transcribe the held-out clips clean and round-tripped through the TTS codec:
mean CER/WER per clip and transcription speed. Last, what the judge makes of audio a young TTS
policy produces instead of the sentence (silence, codec babble, the sentence said three times,
another sentence): CER against the intended text, where higher means harder to game.

    python benchmarks/asr_judge.py [--cache-dir ~/.cache/speechrl]

Prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

SR = 16000


def error_rates(hyps: list[str], refs: list[str]) -> tuple[float, float]:
    from speechrl.rewards.asr import char_error_rate, word_error_rate

    return (float(np.mean([char_error_rate(h, r) for h, r in zip(hyps, refs)])),
            float(np.mean([word_error_rate(h, r) for h, r in zip(hyps, refs)])))


def timed(transcribe, audios: list[np.ndarray]) -> tuple[list[str], float]:
    start = time.perf_counter()
    hyps = transcribe(audios)
    return hyps, len(audios) / (time.perf_counter() - start)


def impostors(audios: list[np.ndarray], texts: list[str], codec, window: int) -> dict[str, list[np.ndarray]]:
    """For each held-out clip, audio that does not say its sentence."""
    from speechrl.rollouts.codec import flatten_codes

    rng, n = np.random.default_rng(0), len(audios)
    babble = []  # as many random units as the clip has frames
    for a in audios:
        units = rng.integers(0, codec.codebook_size, (codec.num_codebooks, int(len(a) / SR * codec.frame_rate)))
        babble.append(codec.decode(flatten_codes(units, codec.codebook_size)))
    return {
        "silence (1 s)": [np.zeros(SR, np.float32) for _ in audios],
        "codec babble (random ids)": babble,
        "sentence said 3 times": [np.tile(a, 3)[:window] for a in audios],
        "another held-out sentence": [next(audios[j % n] for j in range(i + 1, i + n) if texts[j % n] != texts[i])
                                      for i in range(n)],
    }


def main() -> None:
    from speechrl.data.manifest import SpeechDataset, read_manifest
    from speechrl.rewards.asr_judge import SCORES, BackboneAsrJudge, JudgeBuild, _codec
    from speechrl.rlhf.trainers.judges import ensure_embedded_judge, judge_corpus
    from speechrl.rewards.intelligibility import PocketsphinxJudge

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, help="build into (or reuse) this cache; default: a fresh temporary one")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        cache = args.cache_dir or Path(scratch)
        start = time.perf_counter()
        path = ensure_embedded_judge(cache, JudgeBuild())
        build_seconds = time.perf_counter() - start
        stored = json.loads((path / SCORES).read_text())
        (_, clean_heldout), (_, coded_heldout) = judge_corpus(cache)
        splits = {name: SpeechDataset(read_manifest(m), SR).items
                  for name, m in (("clean", clean_heldout), ("round-tripped", coded_heldout))}
        judge, sphinx = BackboneAsrJudge(path), PocketsphinxJudge()
        codec = _codec(cache, JudgeBuild())

        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; judge: {path}")
        print(f"judge ready in {build_seconds:.0f} s in this run; its build took {stored['build_seconds']:.0f} s "
              f"({stored['build']['steps']} SFT steps)\n")
        print("| judge | held-out clips | CER | WER | clips/s |")
        print("|---|---|---|---|---|")
        for name, items in splits.items():
            audios, refs = [a for _, a in items], [ex.text for ex, _ in items]
            for label, transcribe in (("embedded", judge.transcribe_batch),
                                      ("pocketsphinx", lambda xs: [sphinx.transcribe(x) for x in xs])):
                hyps, speed = timed(transcribe, audios)
                cer, wer = error_rates(hyps, refs)
                print(f"| {label} | {name} ({len(items)}) | {cer:.3f} | {wer:.3f} | {speed:.1f} |")

        items = splits["round-tripped"]
        refs = [ex.text for ex, _ in items]
        print("\n| embedded judge on audio that does not say the text | CER vs the text | empty transcripts |")
        print("|---|---|---|")
        for label, audios in impostors([a for _, a in items], refs, codec, judge.window).items():
            hyps = judge.transcribe_batch(audios)
            print(f"| {label} | {error_rates(hyps, refs)[0]:.3f} | {sum(not h for h in hyps)}/{len(hyps)} |")


if __name__ == "__main__":
    main()
