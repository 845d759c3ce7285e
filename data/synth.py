"""Build a synthetic spoken corpus with espeak-ng: no system packages, no downloads.

The `espeakng-loader` wheel ships libespeak-ng, driven through ctypes; a closed command grammar (33
words, 2-6 word sentences) lets a tiny model learn ASR in minutes. The build is deterministic in its
parameters and resumable. libespeak-ng keeps static state (wavegen.c's flutter phase, AGC) that no
call resets, so a sentence used to vary with what came before; the engine now reloads the library
before each clip (3 ms), so a clip's bytes depend on its text and settings alone, in any order or
process. `corpus.json` records a fingerprint of the finished corpus for comparing machines.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import random
import re
import threading
import time
from pathlib import Path

import numpy as np
import soxr
from tqdm import tqdm

from speechrl.data.audio import write_wav
from speechrl.rlhf.core.fingerprint import fingerprint
from speechrl.data.manifest import Example, write_manifest

log = logging.getLogger(__name__)

# Bump when the grammar or the synthesis changes, so finished corpora are rebuilt (2: each clip
# synthesized by a freshly loaded espeak-ng, so it no longer depends on the clips before it).
BUILDER_VERSION = 2
_MARKER = "corpus.json"
_WAV_NAME = re.compile(r"^\d{5}_[0-9a-f]{12}\.wav$")
# Built-in sentences must stay short even at the slowest rate; longer clips are dropped.
MAX_SECONDS = 4.0

# --- the command grammar -------------------------------------------------------------------
_NUMBERS = "one two three four five six seven eight nine ten".split()
_DIRECTIONS = "left right forward back up down".split()
_COLORS, _OBJECTS = ["red", "blue", "green"], ["box", "ball", "cube"]
_TEMPLATES = (  # {d} direction, {n} number, {u} unit, {c} colour, {o} object
    "go {d}", "move {d}", "turn left", "turn right",
    "move {d} {n} {u}", "go {d} {n} steps", "turn {lr} {n} degrees",
    "pick up the {c} {o}", "put down the {c} {o}", "move the {c} {o} {d}",
    "go {d} {n} steps and stop", "stop and turn {lr}",
)


def command_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` random sentences from the closed command grammar (repeats allowed), deterministic."""
    rng = random.Random(seed)
    return [
        rng.choice(_TEMPLATES).format(
            d=rng.choice(_DIRECTIONS), n=rng.choice(_NUMBERS), u=rng.choice(["meters", "steps"]),
            lr=rng.choice(["left", "right"]), c=rng.choice(_COLORS), o=rng.choice(_OBJECTS),
        )
        for _ in range(n)
    ]


# one command of the composed grammar: the templates above less their "and stop" endings, "turn left/right" as one
_CLAUSES = ("go {d}", "move {d} {n} {u}", "turn {lr} {n} degrees", "pick up the {c} {o}", "put down the {c} {o}",
            "move the {c} {o} {d}", "turn {lr}", "go {d} {n} steps")
COMPOSED_MAX_WORDS = 8  # about 2.3 s at 175 wpm, under the TTS recipes' 3.2 s of codec tokens


def composed_commands(n: int, seed: int = 0) -> list[str]:
    """`n` distinct sentences of one or two commands joined by "and" or "then" (at most 8 words; the
    same words as the grammar, plus "then"), deterministic. About 9,700 exist, so a corpus of a few
    thousand is not memorized the way the grammar's 350 sentences are (docs/results.md, issue 22)."""
    rng = random.Random(seed)

    def clause() -> str:
        template = _CLAUSES[rng.randrange(len(_CLAUSES))]
        d, num, c, o = rng.choice(_DIRECTIONS), rng.choice(_NUMBERS), rng.choice(_COLORS), rng.choice(_OBJECTS)
        lr, u = rng.choice(["left", "right"]), rng.choice(["meters", "steps"])
        return template.format(d=d, n=num, c=c, o=o, lr=lr, u=u)

    out: dict[str, None] = {}
    stalled = 0  # draws since the last new sentence: asking for more than exist is an error, not a hang
    while stalled < 100_000:
        if len(out) == n:
            return list(out)
        first = clause()
        if rng.random() < 0.35:
            sentence = first
        else:
            second = clause() if rng.random() < 0.85 else "stop"
            sentence = f"{first} {rng.choice(['and', 'then'])} {second}"
        stalled += 1
        if len(sentence.split()) <= COMPOSED_MAX_WORDS and sentence not in out:
            out[sentence], stalled = None, 0
    raise ValueError(f"composed_commands: asked for {n} distinct sentences, found {len(out)}; ask for at most that")


def read_text_list(path: str | Path) -> list[str]:
    """One sentence per line; blank lines skipped, surrounding whitespace stripped."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    texts = [t for t in lines if t]
    if not texts:
        raise ValueError(f"{path}: no sentences (expected one per line)")
    return texts


# --- espeak-ng through ctypes --------------------------------------------------------------
class _Espeak:
    """The process-wide espeak-ng engine. The C library keeps global state (one voice, one
    callback), so there is one instance and calls are serialised by a lock."""

    _AUDIO_OUTPUT_SYNCHRONOUS, _INIT_DONT_EXIT, _CHARS_UTF8 = 0x02, 0x8000, 1
    _RATE, _PITCH = 1, 3
    _CALLBACK = ctypes.CFUNCTYPE(
        ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
    )

    def __init__(self):
        import espeakng_loader

        self.library_path, self.data_path = espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
        self._chunks: list[np.ndarray] = []
        self._callback = self._CALLBACK(self._collect)  # kept alive: C holds only the pointer
        self.lock = threading.Lock()
        self.lib = None
        self._load()

    def _load(self) -> None:
        """(Re)load libespeak-ng: dlclose drops its static state, so the next clip starts afresh.
        Held under `lock` by callers after the first load."""
        if self.lib is not None:
            import _ctypes

            self.lib.espeak_Terminate()
            _ctypes.dlclose(self.lib._handle)
        lib = ctypes.CDLL(self.library_path)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        # DONT_EXIT: without it espeak calls exit() on a bad data path, killing Python.
        rate = lib.espeak_Initialize(
            self._AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), self._INIT_DONT_EXIT
        )
        if rate <= 0:
            raise RuntimeError(f"espeak-ng failed to initialise with data at {self.data_path}")
        self.lib, self.sample_rate = lib, rate  # 22050 Hz for every voice
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, num_samples, events) -> int:
        if num_samples > 0:  # the final call has 0 samples
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = continue synthesis

    def synth(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        """int16 samples at `self.sample_rate`, the same for the same arguments whatever came before."""
        with self.lock:
            self._load()
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng voice {voice!r} not found under {self.data_path}/lang")
            self.lib.espeak_SetParameter(self._RATE, rate, 0)
            self.lib.espeak_SetParameter(self._PITCH, pitch, 0)
            self._chunks = []
            data = text.encode("utf-8")
            err = self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, self._CHARS_UTF8, None, None)
            if err != 0:
                raise RuntimeError(f"espeak-ng failed (error {err}) on {text!r} with voice {voice!r}")
            return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


_ENGINE: _Espeak | None = None
_ENGINE_LOCK = threading.Lock()


def engine() -> _Espeak:
    """The process's one espeak-ng engine: the library has a single global voice, so synthesis and
    phonemizing (data/piper.py) share it and its lock. Made under a lock: two threads making one each
    initialise the one C library at once, and espeak-ng aborts the process."""
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            _ENGINE = _Espeak()
    return _ENGINE


def synthesize(text: str, voice: str = "en", rate: int = 175, pitch: int = 50,
               sample_rate: int = 16000) -> np.ndarray:
    """Speak `text`: float32 mono at `sample_rate`, leading/trailing silence trimmed to 50 ms."""
    pcm = engine().synth(text, voice, rate, pitch)
    audio = pcm.astype(np.float32) / 32768.0
    loud = np.flatnonzero(np.abs(audio) > 0.01)  # -40 dBFS: espeak's silence is exact zeros
    if len(loud):
        pad = int(0.05 * engine().sample_rate)
        audio = audio[max(loud[0] - pad, 0): loud[-1] + pad]
    return soxr.resample(audio, engine().sample_rate, sample_rate, quality="HQ").astype(np.float32)


# --- the Piper voice as a corpus voice -----------------------------------------------------
PIPER = "piper"  # in `voices`: the Piper voice (data/piper.py); rate sets its speed, pitch is unused
_PIPER_VOICE = None


def _piper_say(text: str, rate: int, name: str, sample_rate: int) -> np.ndarray:
    """The Piper voice at espeak's `rate` (175 wpm = the voice's own speed), its noise drawn per
    clip from the clip's name; noise also depends on earlier calls (data/piper.py, Determinism)."""
    global _PIPER_VOICE
    from speechrl.data.piper import PiperVoice, draw_prosody

    if _PIPER_VOICE is None:
        _PIPER_VOICE = PiperVoice()
    p = draw_prosody(int(_sha1(name)[:8], 16))
    return _PIPER_VOICE.synthesize(text, noise_scale=p.noise_scale, length_scale=175 / rate, noise_w=p.noise_w,
                                   sample_rate=sample_rate)


# --- the corpus builder --------------------------------------------------------------------
def build_corpus(
    out_dir: str | Path,
    *,
    num_utterances: int = 1200,
    heldout_fraction: float = 0.1,
    voices: tuple[str, ...] = ("en", "en-us", "en-gb-x-rp"),
    rates: tuple[int, ...] = (140, 175, 210),
    pitches: tuple[int, ...] = (35, 50, 65),
    texts: list[str] | None = None,
    sample_rate: int = 16000,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Synthesize a corpus into `out_dir` (audio/*.wav + train.jsonl + heldout.jsonl).

    Each utterance gets a random voice/rate/pitch (speaker "<voice>-r<rate>-p<pitch>"); the voice
    "piper" is the Piper voice (data/piper.py) at that rate, with noise drawn per clip. The split
    keeps every (text, voice) pair on one side, so held-out clips are never a voice's re-reading
    of a training sentence. Returns (train manifest, held-out manifest).
    """
    out_dir = Path(out_dir)
    train_path, heldout_path = out_dir / "train.jsonl", out_dir / "heldout.jsonl"
    _check_settings(heldout_fraction, voices, rates, pitches)
    params = {
        "builder_version": BUILDER_VERSION, "num_utterances": num_utterances,
        "heldout_fraction": heldout_fraction, "voices": list(voices), "rates": list(rates),
        "pitches": list(pitches), "sample_rate": sample_rate, "seed": seed,
        "texts_sha1": None if texts is None else _sha1("\n".join(texts)),
    }
    marker = out_dir / _MARKER
    if marker.is_file() and train_path.is_file() and heldout_path.is_file():
        recorded = json.loads(marker.read_text())
        if {k: v for k, v in recorded.items() if k != "fingerprint"} == params:
            return train_path, heldout_path
        log.info("%s: build parameters changed, rebuilding", marker)
    marker.unlink(missing_ok=True)

    plan = _plan(out_dir.absolute() / "audio", num_utterances, voices, rates, pitches, texts,
                 seed, sample_rate)
    # The grammar is meant to stay short; a user's own sentences are kept whatever their length.
    examples = _synthesize_missing(plan, sample_rate, MAX_SECONDS if texts is None else None, out_dir)
    _remove_stale_wavs(out_dir / "audio", {Path(e.audio).name for e in plan})

    train, heldout = _split(examples, heldout_fraction, seed)
    write_manifest(train_path, train)
    write_manifest(heldout_path, heldout)
    params["fingerprint"] = corpus_fingerprint(train, heldout)
    log.info("corpus %s: %d train + %d held-out clips, fingerprint %s", out_dir, len(train), len(heldout),
             params["fingerprint"])
    marker.write_text(json.dumps(params, indent=1))  # last: its presence means "finished"
    return train_path, heldout_path


def corpus_fingerprint(train: list[Example], heldout: list[Example]) -> str:
    """Both splits' ids, texts, speakers and wav bytes, in order: equal on two machines exactly when
    they built the same corpus (wav paths, which name the cache, are left out)."""
    items = []
    for split, examples in (("train", train), ("heldout", heldout)):
        for ex in examples:
            items += [f"{split}|{ex.id}|{ex.text}|{ex.speaker}", Path(ex.audio)]
    return fingerprint(*items)


def _check_settings(heldout_fraction, voices, rates, pitches) -> None:
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if not (voices and rates and pitches):
        raise ValueError("voices, rates and pitches each need at least one value")
    if not all(80 <= r <= 450 for r in rates) or not all(0 <= p <= 100 for p in pitches):
        raise ValueError(f"espeak rates must be in [80, 450] wpm and pitches in [0, 100]: "
                         f"got rates={rates}, pitches={pitches}")


def _synthesize_missing(plan: list[Example], sample_rate: int, max_seconds: float | None,
                        out_dir: Path) -> list[Example]:
    """Write the wavs of `plan` not yet on disk; returns the examples kept (too-long ones dropped)."""
    max_samples = max_seconds * sample_rate if max_seconds else float("inf")
    examples, written, dropped, start = [], 0, 0, time.perf_counter()
    for ex in tqdm(plan, desc="synthesizing", unit="utt", disable=None):
        path = Path(ex.audio)
        if not path.is_file():  # resume: wavs are written atomically, so one on disk is whole
            x = ex.extra
            if x["voice"] == PIPER:
                audio = _piper_say(ex.text, x["rate"], path.name, sample_rate)
            else:
                audio = synthesize(ex.text, x["voice"], x["rate"], x["pitch"], sample_rate)
            if len(audio) > max_samples:
                log.warning("dropping %r (%s): %.1f s > %.1f s", ex.text, ex.speaker,
                            len(audio) / sample_rate, max_seconds)
                dropped += 1
                continue
            write_wav(path, audio, sample_rate)
            written += 1
        examples.append(ex)
    log.info("%s: synthesized %d clips in %.1f s (%d kept from earlier, %d too long)", out_dir,
             written, time.perf_counter() - start, len(examples) - written, dropped)
    return examples


def _plan(audio_dir, n, voices, rates, pitches, texts, seed, sample_rate) -> list[Example]:
    """Every utterance's text, voice and wav path, drawn from `seed` alone."""
    rng = random.Random(seed)
    if texts is None:
        chosen = command_sentences(n, seed)
    else:
        if not texts:
            raise ValueError("texts is empty; pass None for the built-in command grammar")
        order = list(range(len(texts)))
        rng.shuffle(order)  # cycle through all user texts before repeating any
        chosen = [texts[order[i % len(texts)]] for i in range(n)]
    plan = []
    for i, text in enumerate(chosen):
        voice, rate, pitch = rng.choice(voices), rng.choice(rates), rng.choice(pitches)
        # The content hash in the file name makes a wav on disk valid for exactly this utterance.
        key = _sha1(f"{BUILDER_VERSION}|{text}|{voice}|{rate}|{pitch}|{sample_rate}")[:12]
        plan.append(Example(
            id=f"utt{i:05d}", text=text,
            audio=str(audio_dir / f"{i:05d}_{key}.wav"),
            speaker=f"{voice}-r{rate}-p{pitch}",
            extra={"voice": voice, "rate": rate, "pitch": pitch},
        ))
    return plan


def _split(examples: list[Example], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out whole (text, voice) groups until `fraction` of the utterances is reached."""
    groups: dict[tuple[str, str], list[Example]] = {}
    for ex in examples:
        groups.setdefault((ex.text, ex.extra["voice"]), []).append(ex)
    keys = sorted(groups)
    random.Random(seed + 1).shuffle(keys)
    target = round(fraction * len(examples))
    if fraction > 0:
        target = max(target, 1)
    held: set[tuple[str, str]] = set()
    count = 0
    for key in keys:
        if count >= target:
            break
        held.add(key)
        count += len(groups[key])
    train = [e for e in examples if (e.text, e.extra["voice"]) not in held]
    heldout = [e for e in examples if (e.text, e.extra["voice"]) in held]
    return train, heldout


def _remove_stale_wavs(audio_dir: Path, keep: set[str]) -> None:
    """Drop wavs an earlier build with other parameters left (only names this builder makes)."""
    if audio_dir.is_dir():
        for p in audio_dir.iterdir():
            if _WAV_NAME.match(p.name) and p.name not in keep:
                p.unlink()


def _sha1(s: str) -> str:
    return hashlib.sha1(s.encode("utf-8")).hexdigest()
