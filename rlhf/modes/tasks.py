"""What each operational mode asks of the backbone: prompts, training targets, decoding constraint.

A task turns a dataset example (its text and clip) into what the trainers and rollouts need:

    AsrTask       prompt = the clip + "Transcribe the audio."   reply = transcript tokens, <|im_end|>
    TtsTask       prompt = [voice prompt] + "Say: <text>"       reply = codec tokens, <|codec_end|>
    RealtimeTask  prompt = persona card + dialogue so far (text)  reply = text tokens, codec tokens,
                  + the user's latest turn (the clip)                   <|codec_end|>

TTS and realtime replies' codec tokens come from the recipe's codec (`CodecSpec`): target clips are
encoded for SFT, and generated tokens are decoded back to audio only on the reward side
(rewards/worker.py). `reward_codec` is the codec spec reward workers decode with (None: they do not).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from speechrl.rlhf.model.prompts import render_prompt, render_tts_prompt
from speechrl.rlhf.model.backbone import IM_END, allowed_token_ids
from speechrl.rlhf.core.config import RecipeConfig
from speechrl.rollouts.types import RolloutRequest


class AsrTask:
    mode = "asr"

    def __init__(self, cfg: RecipeConfig, processor):
        self.cfg, self.processor, self.tokenizer = cfg, processor, processor.tokenizer
        self.prompt = render_prompt(processor, "asr")
        self.allowed_ids = allowed_token_ids(self.tokenizer, "asr")
        self.stop_ids: Optional[list[int]] = None  # the end-of-turn is vLLM's eos already
        self.reward_codec = None
        self._prompt_ids: dict[str, list[int]] = {}

    def request(self, ex, audio: np.ndarray, dataset=None) -> RolloutRequest:
        return RolloutRequest(self.prompt, audio, self.cfg.data.sample_rate,
                              {"id": ex.id, "text": ex.text, "speaker": ex.speaker})

    def sft_example(self, ex, audio: np.ndarray, dataset=None) -> tuple[list[int], list[int], Optional[np.ndarray]]:
        """(prompt ids, completion ids, the clip the prompt's audio placeholder stands for)."""
        from speechrl.rlhf.model.logprobs import prompt_ids_for

        # prompt ids depend on the clip only through its length (placeholder count): once per example
        if ex.id not in self._prompt_ids:
            self._prompt_ids[ex.id] = prompt_ids_for(self.processor, self.prompt, audio)
        target = self.tokenizer(ex.text, add_special_tokens=False)["input_ids"]
        return self._prompt_ids[ex.id], target + [self.tokenizer.convert_tokens_to_ids(IM_END)], audio


class _SpeakingTask:
    """What the modes that emit codec tokens share: the recipe's codec (built once, or the one
    given), its tokens in the backbone's vocabulary, and `<|codec_end|>` as the stop token."""

    def __init__(self, cfg: RecipeConfig, processor, codec=None):
        from speechrl.rollouts.codec import CodecSpec, CodecTokens

        self.cfg, self.processor, self.tokenizer = cfg, processor, processor.tokenizer
        self.codec_spec = CodecSpec.from_recipe(cfg)
        self.codec = codec or self.codec_spec.build()
        self.tokens = CodecTokens(self.tokenizer, self.codec)
        self.stop_ids = [self.tokens.end_id]
        self._targets: dict[str, list[int]] = {}  # example id -> the completion ids it is trained toward


class TtsTask(_SpeakingTask):
    mode = "tts"

    def __init__(self, cfg: RecipeConfig, processor, codec=None):
        from speechrl.rollouts.codec import vocab_size

        super().__init__(cfg, processor, codec)
        self.allowed_ids = allowed_token_ids(self.tokenizer, "tts", vocab_size(self.codec))
        self.reward_codec = self.codec_spec
        self._voices: dict[str, list[int]] = {}

    # --- prompts ---------------------------------------------------------------------------------
    def render(self, text: str, voice_ids: Optional[list[int]] = None) -> str:
        return render_tts_prompt(self.processor, text, voice_ids)

    def prompt_ids(self, text: str, voice_ids: Optional[list[int]] = None) -> list[int]:
        return self.tokenizer(self.render(text, voice_ids), add_special_tokens=False)["input_ids"]

    def encode(self, audio: np.ndarray, sample_rate: int, max_seconds: Optional[float] = None) -> list[int]:
        """A clip as the backbone's codec token ids (no end token)."""
        if max_seconds:
            audio = audio[: int(max_seconds * sample_rate)]
        return self.tokens.to_backbone(self.codec.encode(audio, sample_rate))

    def target(self, ex, audio: np.ndarray) -> list[int]:
        if ex.id not in self._targets:
            self._targets[ex.id] = self.encode(audio, self.cfg.data.sample_rate) + [self.tokens.end_id]
        return self._targets[ex.id]

    def voice(self, ex, dataset) -> Optional[list[int]]:
        """With tts.voice_prompt: another clip of the example's speaker, as codec token ids; None otherwise."""
        if not self.cfg.tts.voice_prompt:
            return None
        if ex.id not in self._voices:
            ref = _reference_clip(ex, dataset)
            self._voices[ex.id] = [] if ref is None else self.encode(ref, self.cfg.data.sample_rate,
                                                                       self.cfg.tts.max_voice_seconds)
        return self._voices[ex.id] or None

    # --- what trainers and rollouts take ---------------------------------------------------------
    def request(self, ex, audio: np.ndarray, dataset=None) -> RolloutRequest:
        voice = self.voice(ex, dataset) if dataset is not None else None
        meta = {"id": ex.id, "text": ex.text, "speaker": ex.speaker}
        if voice:
            meta["reference_codec_ids"] = self.tokens.from_backbone(voice)
        return RolloutRequest(self.render(ex.text, voice), None, self.cfg.data.sample_rate, meta)

    def sft_example(self, ex, audio: np.ndarray, dataset=None) -> tuple[list[int], list[int], None]:
        voice = self.voice(ex, dataset) if dataset is not None else None
        return self.prompt_ids(ex.text, voice), self.target(ex, audio), None

    def codec_ids(self, completion_ids: list[int]) -> list[int]:
        """A completion's codec-local ids (up to `<|codec_end|>`), what the reward side decodes."""
        return self.tokens.from_backbone(completion_ids)


@dataclass(frozen=True)
class SpokenReply:
    """A realtime completion read back: its text part, its audio part, and when the audio began."""

    text: str  # the text tokens before the first codec token, decoded
    codec_ids: list[int]  # codec-local ids of the audio part (up to <|codec_end|>)
    ttfa_tokens: Optional[int]  # tokens generated before the first audio token; None: no audio at all
    ended: bool  # closed by <|codec_end|> (False: cut at the length cap)
    seconds: float  # duration of the audio part, from the codec's frame rate


class RealtimeTask(_SpeakingTask):
    """Persona dialogue, spoken replies. Layout and decoding constraint: rollouts/layout.py; the
    prompt: data/prompts.py (`realtime`); earlier turns are text, the user's latest is audio."""

    mode = "realtime"

    def __init__(self, cfg: RecipeConfig, processor, codec=None):
        from speechrl.rlhf.model.layout import ReplyLayout

        super().__init__(cfg, processor, codec)
        text = [i for i in allowed_token_ids(self.tokenizer, "asr") if i != self.tokenizer.convert_tokens_to_ids(IM_END)]
        self.layout = ReplyLayout(tuple(text), tuple(int(i) for i in self.tokens.token_ids), self.tokens.end_id,
                                  cfg.realtime.max_text_tokens)
        self.allowed_ids = self.layout
        self.reward_codec = self.codec_spec if cfg.realtime.decode_replies else None
        self._prompts: dict[str, list[int]] = {}  # turn example id -> its prompt ids (placeholder expanded)

    def render(self, persona: str, history) -> str:
        """The prompt text: the rendered card, the earlier turns ({"role", "text"}), the audio placeholder."""
        return render_prompt(self.processor, "realtime", {"persona": persona, "history": list(history)})

    def request(self, persona: str, history, audio: np.ndarray, metadata: dict) -> RolloutRequest:
        return RolloutRequest(self.render(persona, history), audio, self.cfg.data.sample_rate, metadata)

    def reply_ids(self, text: str, codec_ids) -> list[int]:
        """A reply as completion ids in the layout: text tokens, codec tokens, <|codec_end|>."""
        return (self.tokenizer(text, add_special_tokens=False)["input_ids"] + self.tokens.to_backbone(codec_ids)
                + [self.tokens.end_id])

    def sft_example(self, ex, audio: np.ndarray, dataset=None) -> tuple[list[int], list[int], np.ndarray]:
        """(prompt ids, the reference reply's completion ids, the user clip) of a realtime_data.TurnExample."""
        from speechrl.data.audio import load_audio
        from speechrl.rlhf.model.logprobs import prompt_ids_for

        if ex.id not in self._targets:
            codec_ids = ex.reply_codec_ids
            if codec_ids is None:
                rate = self.cfg.data.sample_rate
                codec_ids = self.codec.encode(load_audio(ex.reply_audio, rate, min_seconds=0.0), rate)
            self._targets[ex.id] = self.reply_ids(ex.reply_text, codec_ids)
            self._prompts[ex.id] = prompt_ids_for(self.processor, self.render(ex.persona, ex.history), audio)
        return self._prompts[ex.id], self._targets[ex.id], audio

    def parse(self, completion_ids: list[int]) -> SpokenReply:
        """Split a completion into its text and audio parts (the layout guarantees text comes first)."""
        codec = self.layout.codec_set
        first = next((k for k, t in enumerate(completion_ids) if t in codec), None)
        text_ids = completion_ids if first is None else completion_ids[:first]
        codec_ids = [] if first is None else self.tokens.from_backbone(completion_ids[first:])
        per_second = self.codec.frame_rate * self.codec.num_codebooks
        return SpokenReply(text=self.tokenizer.decode(text_ids, skip_special_tokens=True).strip(), codec_ids=codec_ids,
                           ttfa_tokens=first, ended=bool(completion_ids) and completion_ids[-1] == self.tokens.end_id,
                           seconds=len(codec_ids) / per_second)

    def codec_ids(self, completion_ids: list[int]) -> list[int]:
        """The audio part's codec-local ids, what the reward side decodes."""
        return self.parse(completion_ids).codec_ids


def _reference_clip(ex, dataset) -> Optional[np.ndarray]:
    """The first other example of the same speaker in `dataset` (deterministic), or None."""
    for other, audio in dataset.items:
        if other.speaker == ex.speaker and other.id != ex.id:
            return audio
    return None


def make_task(cfg: RecipeConfig, processor, codec=None):
    if cfg.mode == "tts":
        return TtsTask(cfg, processor, codec)
    if cfg.mode == "realtime":
        return RealtimeTask(cfg, processor, codec)
    return AsrTask(cfg, processor)
