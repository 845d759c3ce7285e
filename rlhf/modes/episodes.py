"""Multi-turn realtime episodes: a scripted user, the policy's spoken replies, batched on vLLM.

The user is scripted (turn k follows reply k-1 whatever it said, as in PersonaGym), so episodes batch:
each turn is one generate call with n samples per episode, all trained on, and the episode goes on with
its first sample so later histories stay on-policy. Samples carry the columns of docs/rewards.md's
"Realtime rewards"; rewards are scored afterwards, all turns in one batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from speechrl.data.dialogues import Dialogue, Turn
from speechrl.data.personas import PersonaCard, render
from speechrl.rlhf.modes.realtime_data import UserSpeech
from speechrl.rollouts.types import RolloutRequest, Sample

Generate = Callable[[list[RolloutRequest]], list[Sample]]


@dataclass
class UserTurn:
    """What the environment says: the user's words (text, for the history) and speech (for the encoder)."""

    text: str
    audio: np.ndarray
    meta: dict  # the script turn's meta: the builtin probes' probe and target, PersonaGym's task


class DialogueEnv:
    """One scripted dialogue with a persona; see the module docstring."""

    def __init__(self, speech: UserSpeech, max_turns: int):
        if max_turns < 1:
            raise ValueError(f"DialogueEnv: max_turns must be >= 1, got {max_turns}")
        self.speech, self.max_turns = speech, max_turns
        self.script: list[Turn] = []
        self.turn = 0

    def reset(self, persona: PersonaCard, turns: Sequence[Turn]) -> UserTurn:
        """Start an episode: `turns` are the user's side of the dialogue, the opening turn first
        (assistant turns among them are skipped). Returns the opening turn."""
        self.persona, self.persona_text = persona, render(persona)
        self.script = [t for t in turns if t.role == "user"][: self.max_turns]
        if not self.script:
            raise ValueError(f"DialogueEnv: persona {persona.id!r}: the script has no user turn")
        self.history: list[dict] = []
        self.turn = 0
        return self._user_turn()

    def step(self, reply: str) -> Optional[UserTurn]:
        """Record the policy's reply (its text) to the current user turn; the next user turn, or None."""
        if self.done:
            raise RuntimeError("DialogueEnv.step after the episode ended; call reset() first")
        self.history += [{"role": "user", "text": self._text(self.script[self.turn])},
                         {"role": "assistant", "text": reply}]
        self.turn += 1
        return None if self.done else self._user_turn()

    @property
    def done(self) -> bool:
        return self.turn >= len(self.script)

    def _user_turn(self) -> UserTurn:
        turn = self.script[self.turn]
        if turn.audio is None:
            raise ValueError(f"DialogueEnv: user turn {self.turn} ({turn.text!r}) has no audio; speak the "
                             "dialogues first (data.dialogues.synthesize_user_turns)")
        return UserTurn(self._text(turn), self.speech(turn.audio), dict(turn.meta))

    @staticmethod
    def _text(turn: Turn) -> str:
        return turn.text or "(no transcript)"


def run_episodes(task, dialogues: Sequence[Dialogue], speech: UserSpeech, max_turns: int, generate: Generate,
                 n: int = 1) -> tuple[list[RolloutRequest], list[Sample]]:
    """Play one episode per dialogue (see the module docstring); `generate(requests)` samples n
    completions per request. Returns every turn's requests and samples, flat: a sample's
    `prompt_index` points into the returned requests, so each (episode, turn) is one GRPO group."""
    envs = [DialogueEnv(speech, max_turns) for _ in dialogues]
    observations: list[Optional[UserTurn]] = [env.reset(d.persona, d.turns) for env, d in zip(envs, dialogues)]
    requests: list[RolloutRequest] = []
    samples: list[Sample] = []
    live = list(range(len(envs)))
    while live:
        turn_requests = [task.request(envs[i].persona_text, envs[i].history, observations[i].audio,
                                      _columns(dialogues[i], envs[i], observations[i])) for i in live]
        began = time.perf_counter()
        out = generate(turn_requests)
        elapsed_ms = 1000 * (time.perf_counter() - began)
        # wall time per decode step of this batched call: the estimate of ttfa_ms (docs/realtime.md)
        step_ms = elapsed_ms / max(1, max(len(s.completion_ids) for s in out))
        replies = [task.parse(s.completion_ids) for s in out]
        for s, reply in zip(out, replies):
            s.metadata.update(ttfa_tokens=reply.ttfa_tokens, reply_seconds=reply.seconds,
                              ttfa_ms=None if reply.ttfa_tokens is None else (reply.ttfa_tokens + 1) * step_ms)
            s.prompt_index += len(requests)
        first = {s.prompt_index: reply for s, reply in zip(out, replies) if s.sample_index == 0}
        for k, i in enumerate(live):
            observations[i] = envs[i].step(first[len(requests) + k].text)
        requests += turn_requests
        samples += out
        live = [i for i in live if observations[i] is not None]
    return requests, samples


def _columns(dialogue: Dialogue, env: DialogueEnv, user: UserTurn) -> dict:
    """A turn's context, as reward batch columns (every sample has the same keys)."""
    return {"id": f"{dialogue.id}/t{env.turn}", "dialogue_id": dialogue.id, "turn": env.turn,
            "persona": env.persona_text, "history": [dict(h) for h in env.history], "user_text": user.text,
            "probe": user.meta.get("probe") or user.meta.get("task"), "target": user.meta.get("target")}
