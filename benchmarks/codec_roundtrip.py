"""Round-trip intelligibility of the embedded codec on real recordings.

For each clip in ../shared/data/real_speech (librivox, cards, speechbrain_asr, misc LJSpeech and
JFK; resampled to 16 kHz by data.audio.load_audio): pocketsphinx's WER on the original, and on the
clip encoded then decoded by `MelUnitCodec` fit the default way (espeak-ng readings of the Harvard
sentences), in two shapes: the default 2 x 512 codebooks at hop 256 (125 ids/s) and the TTS
recipe's 1 x 1024 at hop 320 (50 ids/s, rlhf/core/config.py EmbeddedCodecConfig); each as it was and
with decode smoothing (`smooth_frames=3`, the recommended setting), which decodes the same ids
from the same codebooks. Then ids per second, the fit time, and encode/decode speed (seconds of
audio per second of wall time).

    python benchmarks/codec_roundtrip.py [--data ../shared/data/real_speech]

Prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import tempfile
import time
from pathlib import Path

import numpy as np

SR = 16000
TTS_SHAPE = dict(hop_length=320, num_codebooks=1, codebook_size=1024, n_cepstra=24, griffin_lim_iters=16)
CONFIGS = {"2x512": dict(), "2x512 smooth3": dict(smooth_frames=3),
           "1x1024 hop320": TTS_SHAPE, "1x1024 hop320 smooth3": dict(TTS_SHAPE, smooth_frames=3)}


def real_clips(root: Path) -> list[tuple[str, np.ndarray, str]]:
    """(name, 16 kHz waveform, transcript) for every labelled recording."""
    from speechrl.data.audio import load_audio

    clips = []
    for wav in sorted((root / "librivox").glob("*.wav")):
        clips.append((f"librivox/{wav.name}", load_audio(wav, SR), wav.with_suffix(".txt").read_text().strip()))
    labels = re.findall(r"<s>(.*?)</s>\s*\((\d+)\)", (root / "cards" / "cards.transcription").read_text())
    for text, number in labels:
        clips.append((f"cards/{number}.wav", load_audio(root / "cards" / f"{number}.wav", SR), text.strip()))
    for line in (root / "speechbrain_asr" / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        clips.append((f"speechbrain_asr/{row['audio']}", load_audio(root / "speechbrain_asr" / row["audio"], SR),
                      row["text"]))
    clips.append(("misc/LJ050-0131.wav", load_audio(root / "misc" / "LJ050-0131.wav", SR),
                  "unless a system is established for the frequent formal review of activities thereunder. "
                  "in this regard"))
    clips.append(("misc/jfk.flac", load_audio(root / "misc" / "jfk.flac", SR),
                  "And so my fellow Americans, ask not what your country can do for you, ask what you can do "
                  "for your country."))
    return clips


def main() -> None:
    from speechrl.rewards.asr import word_error_rate
    from speechrl.rewards.intelligibility import PocketsphinxJudge
    from speechrl.rollouts.mel_codec import MelCodecConfig, default_codec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/real_speech")
    args = parser.parse_args()

    clips = real_clips(args.data)
    judge = PocketsphinxJudge()
    codecs, fit_seconds = {}, {}
    with tempfile.TemporaryDirectory() as cache:
        for name, overrides in CONFIGS.items():
            start = time.perf_counter()
            codecs[name] = default_codec(cache, MelCodecConfig(**overrides))
            fit_seconds[name] = time.perf_counter() - start
    audio_seconds = sum(len(a) for _, a, _ in clips) / SR
    encode_s, decode_s, ids_total = dict.fromkeys(codecs, 0.0), dict.fromkeys(codecs, 0.0), dict.fromkeys(codecs, 0)
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; clips: {len(clips)} ({audio_seconds:.0f} s)\n")
    print("| clip | s | WER original | " + " | ".join(f"WER {n}" for n in codecs) + " |")
    print("|---|---|---|" + "---|" * len(codecs))
    folders: dict[str, list[list[float]]] = {}
    for name, audio, text in clips:
        row = [word_error_rate(judge.transcribe(audio), text)]
        for key, codec in codecs.items():
            t0 = time.perf_counter()
            ids = codec.encode(audio, SR)
            t1 = time.perf_counter()
            decoded = codec.decode(ids)
            encode_s[key] += t1 - t0
            decode_s[key] += time.perf_counter() - t1
            ids_total[key] += len(ids)
            row.append(word_error_rate(judge.transcribe(decoded), text))
        folders.setdefault(name.split("/")[0], []).append(row)
        print(f"| {name} | {len(audio) / SR:.1f} | " + " | ".join(f"{w:.2f}" for w in row) + " |")
    print("\n| folder | clips | mean WER original | " + " | ".join(f"mean WER {n}" for n in codecs) + " |")
    print("|---|---|---|" + "---|" * len(codecs))
    for folder, rows in [*folders.items(), ("all", [r for rows in folders.values() for r in rows])]:
        means = np.mean(rows, axis=0)
        print(f"| {folder} | {len(rows)} | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    print("\n| codec | ids/s | fit (synthesis + k-means; smoothed: loads the codebooks above) s "
          "| encode x realtime | decode x realtime |")
    print("|---|---|---|---|---|")
    for key in codecs:
        print(f"| {key} | {ids_total[key] / audio_seconds:.1f} | {fit_seconds[key]:.1f} | "
              f"{audio_seconds / encode_s[key]:.0f} | {audio_seconds / decode_s[key]:.1f} |")


if __name__ == "__main__":
    main()
