"""The duplex mode's data: synthetic full-duplex dialogues on the chunk clock, built by our own code.

A dialogue is the user's audio channel (one waveform: utterances placed on the timeline, silence
between) and, for every chunk of `duplex.chunk_seconds`, what a good assistant does then (`labels`)
and what it says (the reference SFT learns: `Plan.reply`). The kinds (docs/duplex.md):

  turn         the user says something and stops: answer from the next chunk
  pause        the user stops mid-sentence after a filler ("..., um") and goes on: stay silent through the pause
  backchannel  the user says "mm-hm" while the assistant speaks: keep speaking
  interrupt    the user starts talking while the assistant speaks: stop, listen, answer what they said
  tool         the user asks what a tool answers: a tool call (JSON) on the action channel, then speak

Plans (what is said, by whom, when) come from a seeded generator, so a build is the same on any
machine; speech is synthesized once per (text, voice, rate) into run.cache_dir and placed on the
timeline at load time. A chunk's decision reads the user's audio up to the chunk's end, the last
audio window of it (the backbone's encoder window: a sliding window stands in for a streaming encoder).
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from speechrl.rlhf.core.config import RecipeConfig

KINDS = ("turn", "pause", "backchannel", "interrupt", "tool")

from speechrl.rewards.duplex import (ACT, BACKCHANNEL, EITHER, LISTEN, PAUSE, SPEAK, STOP,  # noqa: F401
                                    action_text, same_action)

# --- what is said ----------------------------------------------------------------------------------
_ASKS = ("tell me about", "what do you know about", "can you explain", "I want to hear about", "talk to me about",
         "give me a fact about")
_TOPICS = ("the moon", "green tea", "old trains", "the ocean", "jazz music", "my garden", "honey bees", "the desert",
           "paper planes", "the piano", "volcanoes", "chess", "coffee beans", "the rainforest", "bicycles",
           "the stars", "penguins", "castles", "rivers", "clocks")
_FILLERS = ("um", "uh", "hmm", "well, um")
_BACKCHANNELS = ("mm-hm", "yeah", "okay", "right", "uh-huh", "I see")
_INTERJECTIONS = ("wait,", "sorry,", "actually,", "hold on,", "no, stop,")
_CITIES = ("paris", "london", "tokyo", "berlin", "cairo", "lima", "oslo", "rome", "delhi", "sydney")
_NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# (what the user says, the tool call it asks for), by what the call's argument is. A tool request draws
# the argument's kind first, then one of its sentences, so that each city and each number is heard about
# as often: drawing one of the four sentences gave a number of minutes 7 training dialogues to a city's
# 18, and the held-out calls that missed were minutes (docs/results.md; after the change, the cities)
_TOOL_ASKS = {
    "city": (("what is the weather in {city}", lambda city, n: {"tool": "weather", "city": city}),
             ("is it raining in {city}", lambda city, n: {"tool": "weather", "city": city}),
             ("what time is it in {city}", lambda city, n: {"tool": "time", "city": city})),
    "minutes": (("set a timer for {n} minutes", lambda city, n: {"tool": "timer", "minutes": _NUMBERS.index(n) + 2}),),
}


@dataclass(frozen=True)
class Plan:
    """A dialogue before its audio exists: who says what, and when (seconds); timings that depend on
    how long the speech lasts are resolved on the chunk clock by `lay_out` once it is synthesized."""

    id: str
    kind: str
    voice: str
    rate: int
    lead: float  # silence before the user's first word
    first: str  # the user's first utterance (its second part, for a pause)
    reply: str  # what the assistant answers (reference speech)
    second: Optional[str] = None  # pause: the sentence's rest; backchannel: the backchannel; interrupt: the interruption
    gap_chunks: int = 0  # pause: silent chunks mid-sentence; backchannel, interrupt: reply chunks before the user cuts in
    second_reply: Optional[str] = None  # interrupt: the answer to the interruption
    action: Optional[str] = None  # tool: the expected call (action_text)


def plan_dialogues(cfg: RecipeConfig, split: str) -> list[Plan]:
    """The split's plans ("train" or "heldout"): `duplex.dialogues_per_kind` (`dialogues_by_kind` where
    it names the kind; `heldout_per_kind` held out) of each kind in `duplex.kinds`, drawn from a generator
    seeded by (duplex.seed, split, kind), so a kind's first dialogues are the same whatever its count.
    Held-out dialogues use the same grammar with other draws (topics and cities recur: the clock is what is tested)."""
    d = cfg.duplex
    plans = []
    for kind in d.kinds:
        count = d.dialogues_by_kind.get(kind, d.dialogues_per_kind) if split == "train" else d.heldout_per_kind
        rng = random.Random(f"{d.seed}|{split}|{kind}")
        for i in range(count):
            plans.append(_plan(kind, f"{split}-{kind}-{i:04d}", rng, d.user_voices, d.user_rates))
    return plans


def _plan(kind: str, pid: str, rng: random.Random, voices, rates) -> Plan:
    voice, rate = rng.choice(list(voices)), rng.choice(list(rates))
    lead = rng.choice((0.16, 0.32, 0.48))
    ask, topic = rng.choice(_ASKS), rng.choice(_TOPICS)
    sentence = f"{ask} {topic}"
    reply = f"sure, here is something about {topic}."
    if kind == "turn":
        return Plan(pid, kind, voice, rate, lead, sentence, reply)
    if kind == "pause":  # "tell me about, um," ... "the moon"
        return Plan(pid, kind, voice, rate, lead, f"{ask}, {rng.choice(_FILLERS)},", reply, second=topic,
                    gap_chunks=rng.randint(4, 6))
    if kind == "backchannel":
        return Plan(pid, kind, voice, rate, lead, sentence, reply, second=rng.choice(_BACKCHANNELS),
                    gap_chunks=rng.randint(2, 4))
    if kind == "interrupt":
        other = rng.choice([t for t in _TOPICS if t != topic])
        return Plan(pid, kind, voice, rate, lead, sentence, reply, second=f"{rng.choice(_INTERJECTIONS)} {other}",
                    gap_chunks=rng.randint(2, 4), second_reply=f"okay, {other}.")
    if kind == "tool":
        template, call = rng.choice(_TOOL_ASKS[rng.choice(sorted(_TOOL_ASKS))])
        city, n = rng.choice(_CITIES), rng.choice(_NUMBERS)
        return Plan(pid, kind, voice, rate, lead, template.format(city=city, n=n), "one moment, let me check.",
                    action=action_text(call(city, n)))
    raise ValueError(f"duplex: unknown dialogue kind {kind!r}; choose from {', '.join(KINDS)}")


def plan_texts(plans: list[Plan]) -> list[str]:
    """Everything the plans say or write: what a duplex tiny backbone's tokenizer learns from."""
    texts = []
    for p in plans:
        texts += [t for t in (p.first, p.second, p.reply, p.second_reply) if t]
        if p.action:
            texts += [p.action] * 5  # the calls recur: learn them as few tokens
    return texts


# --- on the clock ----------------------------------------------------------------------------------
@dataclass
class Dialogue:
    """A dialogue laid out on the chunk clock: the user's channel and each chunk's label."""

    id: str
    kind: str
    audio: np.ndarray  # the user's channel, float32 at the recipe's sample rate
    labels: list[str]  # one per chunk
    reply: dict[int, tuple[str, int]]  # reference speech: chunk -> (reply wav, its chunk index within the reply)
    action: Optional[str] = None  # tool: the expected call
    events: dict[str, Any] = field(default_factory=dict)  # chunk indices the metrics read (docs/duplex.md)
    texts: tuple[str, ...] = ()  # what the user says, in order (for the record)

    @property
    def num_chunks(self) -> int:
        return len(self.labels)


def speech_end(audio: np.ndarray, threshold: float = 0.01) -> int:
    """Samples up to the last one louder than `threshold` (espeak-ng and Piper pad with near-silence)."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    return int(loud[-1]) + 1 if len(loud) else 0


class Speaker:
    """Speech for plans: each (text, voice, rate) synthesized once into `out_dir` (a wav named by a hash
    of them) and decoded once per process. espeak-ng voices by name; "piper" is the Piper voice
    without noise, so a clip is the same on every call and machine (data/piper.py, Determinism)."""

    def __init__(self, out_dir: Path, sample_rate: int):
        self.dir, self.sample_rate = Path(out_dir), sample_rate
        self._clips: dict[tuple, np.ndarray] = {}
        self._piper = None

    def path(self, text: str, voice: str, rate: int) -> Path:
        from speechrl.data import synth
        from speechrl.data.audio import write_wav

        key = f"{synth.BUILDER_VERSION}|{text}|{voice}|{rate}|{self.sample_rate}"
        wav = self.dir / f"{hashlib.sha1(key.encode('utf-8')).hexdigest()[:16]}.wav"
        if not wav.is_file():  # written atomically, so a wav on disk is whole
            write_wav(wav, self._synthesize(text, voice, rate), self.sample_rate)
        return wav

    def __call__(self, text: str, voice: str, rate: int) -> np.ndarray:
        from speechrl.data.audio import load_audio

        key = (text, voice, rate)
        if key not in self._clips:
            self._clips[key] = load_audio(self.path(text, voice, rate), self.sample_rate, min_seconds=0.0)
        return self._clips[key]

    def _synthesize(self, text: str, voice: str, rate: int) -> np.ndarray:
        from speechrl.data import synth

        if voice != synth.PIPER:
            return synth.synthesize(text, voice, rate, 50, self.sample_rate)
        if self._piper is None:
            from speechrl.data.piper import PiperVoice

            self._piper = PiperVoice()
        return self._piper.synthesize(text, noise_scale=0.0, length_scale=175 / rate, noise_w=0.0,
                                      sample_rate=self.sample_rate)


def lay_out(plan: Plan, speak: Speaker, reply_speak: Speaker, chunk_seconds: float, sample_rate: int,
            reply_voice: str, reply_rate: int) -> Dialogue:
    """The plan on the clock: the user's channel, each chunk's label, the reference reply's chunks.

    The chunk the user's last sound falls in is the end chunk e; the answer is due from e + 1 (the
    first decision that has heard silence after it). A reply of L chunks (its speech's length) runs
    from there; the dialogue ends 3 chunks into it, or, for an interruption, 3 chunks into the second
    answer: what is tested is when the assistant speaks, not what it goes on to say."""
    chunk = int(round(chunk_seconds * sample_rate))
    pieces: list[tuple[int, np.ndarray]] = []  # (start sample, clip) of the user's channel

    def say(text: str, at_chunk: int) -> int:
        """Place `text` from chunk `at_chunk`; its end chunk."""
        clip = speak(text, plan.voice, plan.rate)
        clip = clip[: max(1, speech_end(clip))]
        pieces.append((at_chunk * chunk, clip))
        return (at_chunk * chunk + len(clip) - 1) // chunk

    def reply_chunks(text: str) -> tuple[str, int]:
        wav = reply_speak.path(text, reply_voice, reply_rate)
        clip = reply_speak(text, reply_voice, reply_rate)
        return str(wav), max(1, math.ceil(speech_end(clip) / chunk))

    labels: dict[int, str] = {}
    reply: dict[int, tuple[str, int]] = {}
    events: dict[str, Any] = {"ends": []}

    def speak_reply(text: str, start: int, count: int, label: str = SPEAK) -> None:
        wav, length = reply_chunks(text)
        for k in range(min(count, length)):
            labels[start + k], reply[start + k] = label, (wav, k)

    lead = int(round(plan.lead / chunk_seconds))
    end = say(plan.first, lead)
    tail = 3  # chunks of the answer a dialogue keeps
    if plan.kind == "pause":
        resume = end + 1 + plan.gap_chunks
        for c in range(end + 1, resume):  # the silent chunks mid-sentence
            labels[c] = PAUSE
        events["pause"] = (end + 1, resume)
        end = say(plan.second, resume)
    events["ends"].append(end)
    start = end + 1
    if plan.kind == "tool":
        labels[start] = ACT
        events["action"] = start
        start += 1
    if plan.kind in ("backchannel", "interrupt"):
        cut_in = start + plan.gap_chunks
        if plan.kind == "backchannel":
            bc_end = say(plan.second, cut_in)
            last = bc_end + tail
            speak_reply(plan.reply, start, last - start + 1)
            for c in range(cut_in, min(bc_end + 3, last + 1)):
                if labels.get(c) == SPEAK:
                    labels[c] = BACKCHANNEL
            events["backchannel"] = (cut_in, bc_end + 3)
        else:
            speak_reply(plan.reply, start, cut_in - start + 1)
            labels[cut_in] = EITHER
            second_end = say(plan.second, cut_in)
            for c in range(cut_in + 1, second_end + 1):
                labels[c] = STOP
                reply.pop(c, None)
            events["interrupt"] = cut_in
            events["ends"].append(second_end)
            speak_reply(plan.second_reply, second_end + 1, tail)
    else:
        speak_reply(plan.reply, start, tail)
    if plan.kind == "tool":
        events["action_text"] = plan.action
    num_chunks = max(labels) + 1
    audio = np.zeros(max(num_chunks * chunk, max(s + len(c) for s, c in pieces)), dtype=np.float32)
    for s, clip in pieces:
        audio[s:s + len(clip)] += clip
    audio = audio[: num_chunks * chunk]
    full = [labels.get(c, LISTEN) for c in range(num_chunks)]
    texts = tuple(t for t in (plan.first, plan.second) if t)
    return Dialogue(plan.id, plan.kind, audio, full, reply, plan.action, events, texts)


def is_event(dialogue: Dialogue, chunk: int) -> bool:
    """A chunk where what to do changes (its label differs from the chunk before), or one inside a
    pause, a backchannel or a tool call: the decisions the metrics test."""
    label = dialogue.labels[chunk]
    return label in (PAUSE, BACKCHANNEL, ACT) or chunk > 0 and label != dialogue.labels[chunk - 1]


def load_dialogues(cfg: RecipeConfig) -> tuple[list[Dialogue], list[Dialogue]]:
    """(training, held-out) dialogues on the clock, their speech synthesized once into run.cache_dir."""
    d = cfg.duplex
    root = Path(cfg.run.cache_dir).expanduser() / "duplex"
    rate = cfg.data.sample_rate
    user, assistant = Speaker(root / "user_speech", rate), Speaker(root / "reply_speech", rate)

    def build(split: str) -> list[Dialogue]:
        return [lay_out(p, user, assistant, d.chunk_seconds, rate, d.reply_voice, d.reply_rate)
                for p in plan_dialogues(cfg, split)]

    return build("train"), build("heldout")


def window(dialogue: Dialogue, chunk: int, chunk_samples: int, window_samples: int) -> np.ndarray:
    """What the encoder hears at `chunk`'s decision: the user's channel up to the chunk's end, its
    last `window_samples`, silence before the dialogue's start (a fresh array: the trainer groups rows
    by their clip object).

    Always the whole window, so that now is always its end. Cut at the dialogue's start, the window
    was padded after the speech by the feature extractor, and padding reads as silence: early in a
    dialogue the model could not tell where now was in it, and the first demo's policy started
    speaking about 10 chunks into every dialogue, wherever the user stopped (docs/duplex.md)."""
    stop = (chunk + 1) * chunk_samples
    out = np.zeros(window_samples, dtype=np.float32)
    heard = dialogue.audio[max(0, stop - window_samples):stop]
    out[window_samples - len(heard):] = heard
    return out
