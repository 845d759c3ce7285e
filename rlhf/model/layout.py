"""The spoken reply's layout: text, then audio-codec tokens, then `<|codec_end|>`, in one generation.

Phases (k = tokens so far): text (no codec yet, k < max_text_tokens: text or codec), switch (no codec
yet, k >= max_text_tokens: codec only), audio (after a codec token: codec or `<|codec_end|>`), so every
reply that ends has audio. Two options serve the duplex mode's 160 ms chunks: `silent_end` allows
`<|codec_end|>` before any audio (a chunk that listens, or holds a tool call only), and
`max_audio_tokens` caps the audio (full: after that many codec tokens only `<|codec_end|>`), and
`audio_start` names a token that must open the audio (codec tokens only after it), so that "speak"
is one token against "listen" (`<|codec_end|>`) and greedy decoding decides between them, not
between `<|codec_end|>` and each codec token alone.
`ReplyLayoutProcessor` (in vLLM) and `layout_phases` (trainer logprobs) must agree token for token,
as the static `allowed_token_ids` do in ASR and TTS.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property

import torch

TEXT, SWITCH, AUDIO, FULL = 0, 1, 2, 3  # phase indices
PHASES = (TEXT, SWITCH, AUDIO, FULL)


@dataclass(frozen=True)
class ReplyLayout:
    """The token sets of the three phases (backbone token ids) and the text budget."""

    text_ids: tuple[int, ...]  # tokens of the reply's text (no specials, no codec tokens)
    codec_ids: tuple[int, ...]  # the codec's tokens; the first one emitted starts the audio
    end_id: int  # <|codec_end|>: ends the reply, allowed once audio has started
    max_text_tokens: int  # text tokens before the audio must start
    silent_end: bool = False  # `<|codec_end|>` allowed before any audio (an empty or text-only reply)
    max_audio_tokens: int = 0  # codec tokens after which only `<|codec_end|>` is allowed; 0 = no cap
    audio_start: int = -1  # the token that opens the audio (then codec tokens); -1: the first codec token opens it

    def __post_init__(self):
        if not self.text_ids or not self.codec_ids:
            raise ValueError("ReplyLayout: text_ids and codec_ids must be non-empty")
        if set(self.text_ids) & set(self.codec_ids) or self.end_id in self.text_ids + self.codec_ids:
            raise ValueError("ReplyLayout: text ids, codec ids and the end id must be disjoint")
        if self.max_text_tokens < 0:
            raise ValueError(f"ReplyLayout: max_text_tokens must be >= 0, got {self.max_text_tokens}")
        if self.audio_start >= 0 and self.audio_start in self.text_ids + self.codec_ids + (self.end_id,):
            raise ValueError("ReplyLayout: audio_start must differ from the text, codec and end ids")
        if self.max_audio_tokens < 0:
            raise ValueError(f"ReplyLayout: max_audio_tokens must be >= 0 (0 = no cap), got {self.max_audio_tokens}")

    def allowed(self, phase: int) -> tuple[int, ...]:
        """The ids allowed in a phase."""
        end = (self.end_id,) if self.silent_end else ()
        opens = (self.audio_start,) if self.audio_start >= 0 else self.codec_ids
        return (self.text_ids + opens + end, opens + end, self.codec_ids + (self.end_id,), (self.end_id,))[phase]

    def phase(self, generated: list[int]) -> int:
        """The phase after the tokens `generated` so far (the rule in the module docstring)."""
        return self.phase_of(sum(t in self.codec_set for t in generated), len(generated),
                             any(t in self.opens for t in generated))

    def phase_of(self, codec_tokens: int, tokens: int, opened: bool) -> int:
        """The phase after `tokens` tokens of which `codec_tokens` were codec tokens; `opened`: the
        audio has started (an `opens` token came)."""
        if opened:
            return FULL if self.max_audio_tokens and codec_tokens >= self.max_audio_tokens else AUDIO
        return SWITCH if tokens >= self.max_text_tokens else TEXT

    def admits(self, ids: list[int]) -> bool:
        """Whether a whole completion keeps the layout: each token allowed in the phase before it."""
        for k, t in enumerate(ids):
            if t not in self.allowed(self.phase(ids[:k])):
                return False
        return bool(ids)

    def masks(self, vocab_size: int) -> torch.Tensor:
        """[4, vocab_size] bool: True where a token is allowed in phase TEXT, SWITCH, AUDIO, FULL."""
        out = torch.zeros(len(PHASES), vocab_size, dtype=torch.bool)
        for phase in PHASES:
            out[phase, list(self.allowed(phase))] = True
        return out

    def as_extra_args(self) -> dict:
        """What a vLLM request carries (SamplingParams.extra_args) for ReplyLayoutProcessor."""
        return {EXTRA_ARGS_KEY: {"text": list(self.text_ids), "codec": list(self.codec_ids), "end": self.end_id,
                                 "max_text": self.max_text_tokens, "silent_end": self.silent_end,
                                 "max_audio": self.max_audio_tokens, "audio_start": self.audio_start}}

    @cached_property
    def codec_set(self) -> frozenset:
        return frozenset(self.codec_ids)

    @cached_property
    def opens(self) -> frozenset:
        """The tokens that start the audio phase."""
        return frozenset((self.audio_start,)) if self.audio_start >= 0 else self.codec_set


EXTRA_ARGS_KEY = "speechrl_reply_layout"


def layout_phases(targets: torch.Tensor, valid: torch.Tensor, codec: torch.Tensor, max_text: int,
                  max_audio: int = 0, opens: torch.Tensor | None = None) -> torch.Tensor:
    """The phase [B, T] in which each target token was sampled (the trainer's side of the rule).

    `valid` marks completion positions; `codec` [V] is True at codec tokens, `opens` [V] at the tokens
    that start the audio (default: the codec tokens). A position is AUDIO after an opening token, and
    FULL there once `max_audio` (> 0) codec tokens came before it; before the audio it is SWITCH once
    `max_text` tokens came before it, else TEXT (invalid positions too).
    """
    valid = valid.bool()
    is_codec = codec.to(targets.device)[targets] & valid
    codec_before = torch.cumsum(is_codec.int(), dim=1) - is_codec.int()
    if opens is not None:
        is_open = opens.to(targets.device)[targets] & valid
        opened_before = torch.cumsum(is_open.int(), dim=1) - is_open.int()
    else:
        opened_before = codec_before
    index = torch.cumsum(valid.int(), dim=1) - valid.int()  # completion tokens before position t
    phase = torch.full_like(targets, TEXT)
    phase = torch.where(index >= max_text, torch.full_like(phase, SWITCH), phase)
    phase = torch.where(opened_before > 0, torch.full_like(phase, AUDIO), phase)
    if max_audio:
        phase = torch.where((opened_before > 0) & (codec_before >= max_audio), torch.full_like(phase, FULL), phase)
    return torch.where(valid, phase, torch.full_like(phase, TEXT))


class LayoutMask:
    """The trainer's form of a ReplyLayout: its phase masks over the vocabulary, ready to index."""

    def __init__(self, layout: ReplyLayout, vocab_size: int):
        self.layout = layout
        self.phase_masks = layout.masks(vocab_size)  # [4, V]
        self.codec = torch.zeros(vocab_size, dtype=torch.bool)
        self.codec[list(layout.codec_ids)] = True
        self.opens = None
        if layout.audio_start >= 0:
            self.opens = torch.zeros(vocab_size, dtype=torch.bool)
            self.opens[layout.audio_start] = True

    def for_targets(self, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, T, V] bool: the tokens allowed at each position, given what the completion held before it."""
        phases = layout_phases(targets, valid, self.codec, self.layout.max_text_tokens, self.layout.max_audio_tokens,
                               self.opens)
        return self.phase_masks.to(targets.device)[phases]


@cache
def reply_layout_processor() -> type:
    """The vLLM logits processor class that applies ReplyLayouts; an engine lists it at start-up.
    Defined when first asked for: it subclasses a vLLM class, and this module is also imported
    where vLLM need not be loaded (the trainer, tests of the rule)."""
    from vllm.v1.sample.logits_processor import LogitsProcessor

    class ReplyLayoutProcessor(LogitsProcessor):
        """Applies a request's ReplyLayout (SamplingParams.extra_args, see `as_extra_args`) while
        vLLM samples: each step, every row of such a request is masked to its phase's tokens.
        Requests without a layout are left alone. Masking happens before temperature, as vLLM's own
        `allowed_token_ids` does, so the reported logprobs are over the allowed tokens."""

        def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
            self.device = device
            # batch row -> [layout, its output ids (a live list), codec tokens among them, whether the
            # audio has opened, ids seen, its masks]
            self.rows: dict[int, list] = {}
            self.disallowed: dict[ReplyLayout, torch.Tensor] = {}  # layout -> [4, V], True where masked

        @classmethod
        def validate_params(cls, params) -> None:
            spec = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
            if spec is not None:
                _layout_from_args(spec)  # raises ValueError on a malformed spec

        def is_argmax_invariant(self) -> bool:
            return False  # it changes which token is the greedy one

        def update_state(self, batch_update) -> None:
            if batch_update is None:
                return
            for index in batch_update.removed:
                self.rows.pop(index, None)
            for index, params, _, output_ids in batch_update.added:
                spec = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
                if spec is None:
                    self.rows.pop(index, None)
                else:
                    self.rows[index] = [_layout_from_args(spec), output_ids, 0, False, 0, None]
            for a, b, direction in batch_update.moved:
                row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
                if row_a is not None:
                    self.rows[b] = row_a
                if row_b is not None and direction.name == "SWAP":
                    self.rows[a] = row_b

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            for index, row in self.rows.items():
                layout, output_ids, codec_tokens, opened, seen, disallowed = row
                # only the tokens added since the last step are new to the count
                new = output_ids[seen:]
                codec_tokens += sum(t in layout.codec_set for t in new)
                opened = opened or any(t in layout.opens for t in new)
                phase = layout.phase_of(codec_tokens, len(output_ids), opened)
                if disallowed is None:  # one [4, V] mask per distinct layout, shared by its rows
                    if layout not in self.disallowed:
                        self.disallowed[layout] = ~layout.masks(logits.shape[-1]).to(logits.device)
                    disallowed = self.disallowed[layout]
                row[2:] = [codec_tokens, opened, len(output_ids), disallowed]
                logits[index].masked_fill_(disallowed[phase], float("-inf"))
            return logits

    return ReplyLayoutProcessor


def _layout_from_args(spec: dict) -> ReplyLayout:
    try:
        return ReplyLayout(tuple(spec["text"]), tuple(spec["codec"]), int(spec["end"]), int(spec["max_text"]),
                           bool(spec.get("silent_end", False)), int(spec.get("max_audio", 0)),
                           int(spec.get("audio_start", -1)))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{EXTRA_ARGS_KEY}: expected text, codec, end and max_text; got keys {sorted(spec)}") from e
