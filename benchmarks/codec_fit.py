"""How well Whisper hears a TTS corpus through the embedded codec, by how the codec is fit and decoded.

A TTS policy is heard through its codec: the round trip of the corpus' own held-out clips is the
best it can sound. For the recipe's corpus (built on first use), Whisper transcribes the held-out
clips clean, then round-tripped through: the espeak-ng-fit codec (the default `fit_on: espeak`),
with and without decode smoothing, and codecs fit on the corpus' first `--fit-clips` training clips
(`fit_on: corpus`) at 24 and 40 cepstra, with and without smoothing.

    python benchmarks/codec_fit.py [--recipe tts/real_sft] [--clips 24] [--fit-clips 300] [--asr whisper-tiny.en]

Prints a markdown table (CER, WER) and the fit times.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np


def main() -> None:
    from speechrl.data.audio import load_audio
    from speechrl.data.manifest import read_manifest
    from speechrl.rewards.asr import char_error_rate, word_error_rate
    from speechrl.rewards.intelligibility import WhisperJudge
    from speechrl.rlhf.core.config import load_recipe
    from speechrl.rlhf.modes.assets import manifests
    from speechrl.rollouts.mel_codec import MelCodecConfig, MelUnitCodec, default_codec

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="tts/real_sft")
    p.add_argument("--clips", type=int, default=24, help="held-out clips transcribed")
    p.add_argument("--fit-clips", type=int, default=300, help="training clips a corpus fit reads")
    p.add_argument("--asr", default="whisper-tiny.en")
    args = p.parse_args()
    cfg = load_recipe(args.recipe)
    train, held = manifests(cfg)
    rate = cfg.data.sample_rate
    rows = read_manifest(held)[: args.clips]
    clips, refs = [load_audio(r.audio, rate, min_seconds=0.0) for r in rows], [r.text for r in rows]
    judge = WhisperJudge(args.asr, cfg.run.cache_dir)
    c = cfg.tts.embedded_codec
    base = MelCodecConfig(hop_length=c.hop_length, num_codebooks=c.num_codebooks, codebook_size=c.codebook_size,
                          n_cepstra=24, griffin_lim_iters=c.griffin_lim_iters)
    table = []

    def score(name: str, audios: list) -> None:
        hyps = judge.transcribe_batch(audios)
        table.append((name, np.mean([char_error_rate(h, r) for h, r in zip(hyps, refs)]),
                      np.mean([word_error_rate(h, r) for h, r in zip(hyps, refs)])))
        print(f"| {name} | {table[-1][1]:.3f} | {table[-1][2]:.3f} |", flush=True)

    def round_trip(codec: MelUnitCodec) -> list:
        return [codec.decode(codec.encode(a, rate)) for a in clips]

    print(f"{args.asr} on {len(clips)} held-out clips of {held}\n\n| audio | CER | WER |\n|---|---:|---:|")
    score("clean", clips)
    espeak = default_codec(cfg.run.cache_dir, base)
    score(f"espeak-ng fit, {base.num_codebooks} x {base.codebook_size}, hop {base.hop_length}, 24 cepstra", round_trip(espeak))
    score("the same ids, smooth_frames 3",
          round_trip(MelUnitCodec(dataclasses.replace(base, smooth_frames=3), espeak.codebooks, espeak.mean_logmel)))
    fit_audio = [load_audio(r.audio, rate, min_seconds=0.0) for r in read_manifest(train)[: args.fit_clips]]
    for cepstra in (24, 40):
        config = dataclasses.replace(base, n_cepstra=cepstra)
        start = time.perf_counter()
        codec = MelUnitCodec.fit(fit_audio, rate, config)
        seconds = time.perf_counter() - start
        score(f"corpus fit ({len(fit_audio)} clips, {seconds:.0f} s), {cepstra} cepstra", round_trip(codec))
        score(f"corpus fit, {cepstra} cepstra, smooth_frames 3",
              round_trip(MelUnitCodec(dataclasses.replace(config, smooth_frames=3), codec.codebooks, codec.mean_logmel)))


if __name__ == "__main__":
    main()
