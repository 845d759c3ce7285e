"""The realtime mode's data: persona dialogues with spoken user turns, and the warm start's turns.

Sources (`realtime.personas`: builtin, made, personagym or a path) are in docs/realtime.md. Held-out
drift dialogues (made-up cards: held-out cards) are chosen by a hash of their id, so the split is
stable; only the user turns an episode plays are spoken (espeak-ng, cached), cut to the backbone's
audio window.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from speechrl.data.dialogues import Dialogue, read_dialogues, spoken_wav, synthesize_user_turns
from speechrl.data.personas import PersonaCard, render
from speechrl.rlhf.core.config import RecipeConfig


def load_dialogues(cfg: RecipeConfig) -> tuple[list[Dialogue], list[Dialogue]]:
    """(training dialogues, drift dialogues) from the recipe's source, every user turn an episode
    plays given audio. Training dialogues keep any assistant turns (reference replies for SFT)."""
    r = cfg.realtime
    train, drift = _text_dialogues(cfg)
    speech_dir = Path(cfg.run.cache_dir).expanduser() / "realtime" / "user_speech"
    speak = dict(rate=r.user_rate, sample_rate=cfg.data.sample_rate)
    return (synthesize_user_turns([_played(d, r.max_turns) for d in train], speech_dir, **speak),
            synthesize_user_turns([_played(d, r.drift_turns) for d in drift], speech_dir, **speak))


def _text_dialogues(cfg: RecipeConfig) -> tuple[list[Dialogue], list[Dialogue]]:
    """(training, drift) dialogues as text, nothing spoken yet."""
    r = cfg.realtime
    if r.personas == "builtin" and r.dialogues is None:
        from speechrl.data.builtin_personas import builtin_dialogues

        drift = builtin_dialogues(r.drift_dialogues_per_persona, r.drift_turns, seed=cfg.seed + 1)
        return (builtin_dialogues(r.dialogues_per_persona, r.max_turns, seed=cfg.seed),
                [replace(d, id=f"drift-{d.id}") for d in drift])  # ids name examples: keep them apart
    if r.personas == "made" and r.dialogues is None:
        return _made_dialogues(cfg)
    dialogues = _source_dialogues(cfg)
    is_held = [zlib.crc32(d.id.encode("utf-8")) % 1000 < r.heldout_fraction * 1000 for d in dialogues]
    train = [d for d, h in zip(dialogues, is_held) if not h]
    held = [d for d, h in zip(dialogues, is_held) if h]
    if not train or not held:
        raise ValueError(f"realtime: {len(dialogues)} dialogues split into {len(train)} for training and "
                         f"{len(held)} for drift evaluation; both need some (realtime.heldout_fraction)")
    return train, held


def _made_dialogues(cfg: RecipeConfig) -> tuple[list[Dialogue], list[Dialogue]]:
    """Made-up cards split by persona: training dialogues on some, drift on cards training never saw.
    The split is the persona judge's (a hash of the card id), so with `heldout_fraction` at most the
    judge's `heldout` the drift personas are ones the trained judge never saw either."""
    from speechrl.data.persona_factory import made_dialogues, made_personas
    from speechrl.data.persona_judgments import split_cards

    r = cfg.realtime
    train_cards, held_cards = split_cards(made_personas(r.made_personas), r.heldout_fraction)
    if not train_cards or not held_cards:
        raise ValueError(f"realtime: realtime.made_personas={r.made_personas} split into {len(train_cards)} cards "
                         f"for training and {len(held_cards)} held out; raise made_personas or change "
                         f"heldout_fraction so that both get some")
    drift = made_dialogues(held_cards[:r.drift_personas], r.drift_dialogues_per_persona, r.drift_turns,
                           seed=cfg.seed + 1)
    return (made_dialogues(train_cards, r.dialogues_per_persona, r.max_turns, seed=cfg.seed),
            [replace(d, id=f"drift-{d.id}") for d in drift])


def _source_dialogues(cfg: RecipeConfig) -> list[Dialogue]:
    r = cfg.realtime
    if r.personas == "personagym":
        from speechrl.data.personagym import import_personagym

        cards, dialogues = import_personagym(on_bad=cfg.data.on_bad_example)
        if r.dialogues is None:
            return list(dialogues)
    elif r.personas == "builtin":
        from speechrl.data.builtin_personas import builtin_personas

        cards = builtin_personas()
    elif r.personas == "made":
        from speechrl.data.persona_factory import made_personas

        cards = made_personas(r.made_personas)
    else:
        from speechrl.data.personas import read_personas

        cards = read_personas(Path(r.personas).expanduser(), on_bad=cfg.data.on_bad_example)
    return list(read_dialogues(Path(r.dialogues).expanduser(), personas=cards, on_bad=cfg.data.on_bad_example))


def _played(dialogue: Dialogue, limit: int) -> Dialogue:
    """The dialogue cut after its `limit`-th user turn (with the assistant turn that answers it)."""
    kept, users = [], 0
    for turn in dialogue.turns:
        users += turn.role == "user"
        if users > limit:
            break
        kept.append(turn)
    return replace(dialogue, turns=tuple(kept))


class UserSpeech:
    """User turns' audio, decoded once per file and cut to the backbone's audio window.

    Every call returns a copy: the trainer groups a batch's rows by their clip *object* and takes
    rows sharing one to share their prompt, which two turns with the same wav (an opener spoken in
    the same voice) but different dialogues do not."""

    def __init__(self, sample_rate: int, max_seconds: float):
        self.sample_rate, self.max_samples = sample_rate, int(max_seconds * sample_rate)
        self._decoded: dict[str, np.ndarray] = {}

    def __call__(self, path: str) -> np.ndarray:
        from speechrl.data.audio import load_audio

        if path not in self._decoded:
            self._decoded[path] = load_audio(path, self.sample_rate, min_seconds=0.0)[: self.max_samples]
        return self._decoded[path].copy()


@dataclass(frozen=True)
class TurnExample:
    """One reply to learn in the warm start: the context, the user's turn and the reference reply."""

    id: str  # "<dialogue id>/t<k>", k from 0
    persona: str  # the rendered card
    history: tuple[dict, ...]  # the earlier turns, {"role", "text"}, with the reference replies
    user_text: str
    user_audio: str  # wav path
    reply_text: str
    reply_audio: Optional[str]  # wav of the reply (espeak-ng), or None when `reply_codec_ids` are given
    reply_codec_ids: Optional[tuple[int, ...]]  # the dialogue file's own codec ids for the reply


class TurnDataset:
    """The warm start's (TurnExample, user audio) pairs, as SFT's loop indexes them."""

    def __init__(self, examples: list[TurnExample], speech: UserSpeech):
        self.examples, self.speech = examples, speech

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[TurnExample, np.ndarray]:
        ex = self.examples[index]
        return ex, self.speech(ex.user_audio)

    def summary(self) -> dict[str, Any]:
        return {"examples": len(self.examples), "kept": len(self.examples), "bad": 0, "reasons": []}


def turn_examples(cfg: RecipeConfig, dialogues: list[Dialogue]) -> list[TurnExample]:
    """Each user turn of each dialogue with its reply: the dialogue's own assistant turn where it has
    one, else a synthetic reference (data/reference_replies.py), spoken by espeak-ng (cached)."""
    from speechrl.data.reference_replies import reference_reply

    r = cfg.realtime
    reply_dir = Path(cfg.run.cache_dir).expanduser() / "realtime" / "reply_speech"
    out = []
    for d in dialogues:
        persona, history, k = render(d.persona), [], 0
        turns = list(d.turns)
        for i, turn in enumerate(turns):
            if turn.role != "user":
                continue
            given = turns[i + 1] if i + 1 < len(turns) and turns[i + 1].role == "assistant" else None
            text = given.text if given else reference_reply(d.persona, turn)
            codec_ids = given.codec_ids if given else None
            audio = given.audio if given and given.audio else None
            if codec_ids is None and audio is None:
                audio = str(spoken_wav(text, reply_dir, voice=r.reply_voice, rate=r.reply_rate, pitch=r.reply_pitch,
                                       sample_rate=cfg.data.sample_rate)[0])
            out.append(TurnExample(f"{d.id}/t{k}", persona, tuple(history), turn.text, turn.audio, text, audio,
                                   codec_ids))
            history += [{"role": "user", "text": turn.text}, {"role": "assistant", "text": text}]
            k += 1
    return out


def realtime_datasets(cfg: RecipeConfig, max_audio_seconds: float) -> tuple[TurnDataset, TurnDataset]:
    """The warm start's (training, held-out) turns: the training dialogues' and the drift dialogues'."""
    train, drift = load_dialogues(cfg)
    speech = UserSpeech(cfg.data.sample_rate, max_audio_seconds)
    return TurnDataset(turn_examples(cfg, train), speech), TurnDataset(turn_examples(cfg, drift), speech)


def tokenizer_texts(cfg: RecipeConfig) -> list[str]:
    """What a realtime tiny backbone's tokenizer learns from: the cards as prompts show them, the
    instruction, the user turns and the reference replies (so prompts and replies stay short)."""
    from speechrl.rlhf.model.prompts import REALTIME_INSTRUCTION
    from speechrl.data.reference_replies import reference_reply

    train, drift = _text_dialogues(cfg)
    cards: dict[str, PersonaCard] = {d.persona.id: d.persona for d in train + drift}
    texts = [render(c) for c in cards.values()] * 20 + [REALTIME_INSTRUCTION] * 50
    for d in train + drift:
        for turn in d.turns:
            texts.append(turn.text if turn.role == "assistant" else f"{turn.text}\n{reference_reply(d.persona, turn)}")
    return texts
