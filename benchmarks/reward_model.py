"""A learned preference reward on the embedded TTS setup: held-out accuracy, by kind of flaw.

Builds preference pairs from the embedded command grammar's distinct sentences (about 350), each
read by espeak-ng in the TTS corpus' voice. Each text gets three pairs, chosen = its reading and
rejected = one flawed rendering of each kind:

    noisy       the same reading under white noise at 5 dB SNR
    truncated   the same reading with its last 40 % cut off (words missing)
    wrong_text  the reading of another text: clean speech, but not what was asked

wrong_text pairs come in swapped couples (text a: A over B; text b: B over A) on the same side of
the recipe's held-out split, so a reading is as often chosen as rejected against its partner:
knowing which readings are "the good ones" is worth nothing there, only hearing whether the audio
says the text. Then it trains `tts/reward_model` on the pairs (recipe overrides are passed through,
e.g. run.init_from=<tts sft run>/final) and scores the run's held-out pairs by kind with the trained
model through the `learned_preference` reward.

    python benchmarks/reward_model.py OUT_DIR [--texts 400] [key=value ...]

Prints a markdown table.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

KINDS = ("noisy", "truncated", "wrong_text")


def make_pairs(cfg, out: Path, num_texts: int) -> Path:
    """Write OUT/pairs.jsonl and its clips (OUT/audio): three pairs for each of `num_texts` texts."""
    from types import SimpleNamespace

    from speechrl.data.audio import write_wav
    from speechrl.data.preferences import PreferencePair, Speech, write_preferences
    from speechrl.data.synth import command_sentences, synthesize
    from speechrl.rlhf.trainers.reward_model import split_by_text

    rng = np.random.default_rng(cfg.seed)
    voice, rate = cfg.data.synthetic, cfg.data.sample_rate
    texts = sorted(set(command_sentences(20_000, seed=cfg.seed)))
    texts = [texts[i] for i in rng.permutation(len(texts))[:num_texts]]
    # the recipe's own split of these texts, so that swapped couples never straddle it
    _, held = split_by_text([SimpleNamespace(pair=SimpleNamespace(text=t)) for t in texts],
                            cfg.reward_model.eval_fraction, cfg.seed)
    held = {h.pair.text for h in held}
    partner = {}
    for side in (False, True):
        couple = [t for t in texts if (t in held) == side]
        for a, b in zip(couple[0::2], couple[1::2]):
            partner[a], partner[b] = b, a

    def wav(name: str, audio: np.ndarray) -> Speech:
        write_wav(out / "audio" / f"{name}.wav", audio, rate)
        return Speech(audio=str(out / "audio" / f"{name}.wav"))

    readings, pairs = {}, []
    for n, text in enumerate(texts):
        audio = synthesize(text, voice.voices[0], voice.rates[0], voice.pitches[0], rate)
        readings[text] = wav(f"{n:04d}", audio)
        noise = rng.standard_normal(len(audio)).astype(np.float32) * np.sqrt(np.mean(audio**2) / 10 ** (5 / 10))
        for kind, flawed in (("noisy", audio + noise), ("truncated", audio[: int(0.6 * len(audio))])):
            pairs.append(PreferencePair(f"{n}-{kind}", text, readings[text], wav(f"{n:04d}-{kind}", flawed),
                                        reason=(kind,)))
    for n, text in enumerate(texts):
        if text in partner:  # an odd text out on its side has no partner
            pairs.append(PreferencePair(f"{n}-wrong_text", text, readings[text], readings[partner[text]],
                                        reason=("wrong_text",)))
    return write_preferences(out / "pairs.jsonl", pairs)


def held_out_accuracy_by_kind(cfg, pairs_file: Path, model_dir: Path) -> dict[str, tuple[int, float]]:
    """kind -> (held-out pairs, share whose chosen side the trained reward scores higher)."""
    from speechrl.data.preferences import encode_pairs, read_preferences
    from speechrl.rewards.learned import LearnedPreferenceReward
    from speechrl.rlhf.trainers.reward_model import split_by_text
    from speechrl.rollouts.codec import CodecSpec

    pairs = encode_pairs(read_preferences(pairs_file), CodecSpec.from_recipe(cfg).build())
    _, held = split_by_text(pairs, cfg.reward_model.eval_fraction, cfg.seed)
    reward = LearnedPreferenceReward(str(model_dir))
    out = {}
    for kind in (*KINDS, "all"):
        sel = [p for p in held if kind == "all" or p.pair.reason == (kind,)]
        scores = reward([""] * 2 * len(sel), text=[p.pair.text for p in sel] * 2,
                        codec_ids=[p.chosen.tolist() for p in sel] + [p.rejected.tolist() for p in sel])["reward"]
        out[kind] = (len(sel), float(np.mean(np.array(scores[:len(sel)]) > np.array(scores[len(sel):]))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--texts", type=int, default=400, help="distinct texts, three pairs each (the grammar "
                        "has about 350)")
    parser.add_argument("overrides", nargs="*", help="tts/reward_model overrides")
    args = parser.parse_intermixed_args()

    from speechrl.rlhf.core.config import load_recipe
    from speechrl.rlhf.trainers.reward_model import run_reward_model

    cfg = load_recipe("tts/reward_model", args.overrides)
    pairs_file = args.out_dir / "pairs.jsonl"
    if not pairs_file.is_file():
        make_pairs(cfg, args.out_dir, args.texts)
    cfg = load_recipe("tts/reward_model", [*args.overrides, f"reward_model.data={pairs_file}"])
    start = time.time()
    summary = run_reward_model(cfg)
    wall = time.time() - start
    by_kind = held_out_accuracy_by_kind(cfg, pairs_file, Path(summary["run"]) / "final")
    print(f"\ninit: {cfg.run.init_from or 'the embedded tiny backbone (random)'}; {cfg.train.steps} steps x "
          f"{cfg.train.batch_size} pairs; {wall:.0f} s in all, training {summary['train wall time (s)']} s")
    print("\n| held-out pairs | n | accuracy at init | accuracy after |\n|---|---:|---:|---:|")
    for kind, (n, acc) in by_kind.items():
        print(f"| {kind} | {n} | 0.5 | {acc:.3f} |")


if __name__ == "__main__":
    main()
