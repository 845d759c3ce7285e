"""Prompt builders, one per operational mode, found by name.

A builder turns an example into chat messages; the backbone's chat template renders them.
"""
from __future__ import annotations

from typing import Optional

from speechrl.rlhf.core.registry import Registry
from speechrl.rlhf.model.backbone import CODEC_END

PROMPT_BUILDERS: Registry = Registry("prompt builder")

ASR_INSTRUCTION = "Transcribe the audio."
TTS_INSTRUCTION = "Say:"
VOICE_INSTRUCTION = "Voice:"
REALTIME_INSTRUCTION = "Stay in character as this persona, and reply to what the user just said."
DUPLEX_INSTRUCTION = "Listen while you talk. Each chunk: stay silent, speak, or call a tool."


@PROMPT_BUILDERS.register("asr")
def asr_messages(example=None) -> list[dict]:
    """One user turn: the audio, then the instruction. The reply is the transcript."""
    return [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": ASR_INSTRUCTION}]}]


@PROMPT_BUILDERS.register("tts")
def tts_messages(example=None) -> list[dict]:
    """One user turn: optionally a voice prompt (codec tokens, already rendered as `<|aN|>` text and
    closed by `<|codec_end|>`), then the text to say. The reply is codec tokens, then `<|codec_end|>`.

    `example`: a mapping with "text" and optionally "voice" (the rendered voice tokens)."""
    if not example or not str(example.get("text", "")).strip():
        raise ValueError("tts prompt: the example has no text to say")
    voice = f"{VOICE_INSTRUCTION} {example['voice']}\n" if example.get("voice") else ""
    return [{"role": "user", "content": f"{voice}{TTS_INSTRUCTION} {example['text'].strip()}"}]


@PROMPT_BUILDERS.register("realtime")
def realtime_messages(example=None) -> list[dict]:
    """A system turn with the instruction and the persona card, the dialogue so far as text turns,
    then the user's latest turn as audio (the one placeholder the audio encoder fills), followed by
    its transcript where the example gives one. The reply is text, then codec tokens, then
    `<|codec_end|>` (rollouts/layout.py).

    `example`: a mapping with "persona" (the rendered card), "history" (the earlier turns, each
    {"role": "user" | "assistant", "text": ...}; an assistant turn as its text only) and optionally
    "user_text" (the latest turn's transcript: `realtime.user_transcript`)."""
    if not example or not str(example.get("persona", "")).strip():
        raise ValueError("realtime prompt: the example has no persona card")
    messages = [{"role": "system", "content": f"{REALTIME_INSTRUCTION}\n{example['persona']}"}]
    for turn in example.get("history") or ():
        if turn["role"] not in ("user", "assistant"):
            raise ValueError(f"realtime prompt: a history turn's role is {turn['role']!r}; use user or assistant")
        messages.append({"role": turn["role"], "content": turn["text"]})
    latest = [{"type": "audio"}]
    if example.get("user_text"):
        latest.append({"type": "text", "text": str(example["user_text"])})
    messages.append({"role": "user", "content": latest})
    return messages


@PROMPT_BUILDERS.register("duplex")
def duplex_messages(example=None) -> list[dict]:
    """The duplex instruction, then the user's channel as audio (the one placeholder: what the
    encoder hears up to now). The assistant's own chunks so far follow the generation prompt
    (`render_duplex_prompt`): each chunk's tokens, closed by `<|codec_end|>`."""
    return [{"role": "system", "content": DUPLEX_INSTRUCTION}, {"role": "user", "content": [{"type": "audio"}]}]


def render_duplex_prompt(processor, stream_ids) -> str:
    """The duplex prompt at a chunk: the messages, then the assistant's chunks so far (token ids, as text)."""
    stream = processor.tokenizer.decode(list(stream_ids), skip_special_tokens=False) if len(stream_ids) else ""
    return render_prompt(processor, "duplex") + stream


def render_prompt(processor, mode: str, example=None) -> str:
    """The prompt text (audio placeholder unexpanded), ending where the model's reply starts."""
    messages = PROMPT_BUILDERS.get(mode)(example)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def template_texts(processor=None) -> list[str]:
    """The fixed text of every mode's prompts, so a tiny backbone's tokenizer learns it compactly."""
    return ["You are a helpful assistant.", "system", "user", "assistant", "Audio 1:", ASR_INSTRUCTION]


def render_tts_prompt(processor, text: str, voice_ids: Optional[list[int]] = None) -> str:
    """The TTS prompt text; a voice prompt (backbone codec-token ids) is written as its `<|aN|>`
    tokens, closed by `<|codec_end|>`. A function, so a reward model reads prompts written this same way."""
    voice = None
    if voice_ids:
        tokenizer = processor.tokenizer
        voice = "".join(tokenizer.convert_ids_to_tokens(list(voice_ids) + [tokenizer.convert_tokens_to_ids(CODEC_END)]))
    return render_prompt(processor, "tts", {"text": text, "voice": voice})


def render_realtime_text_prompt(processor, persona: str, history, user_text: str) -> str:
    """The realtime prompt with the user's latest turn as its text in place of the audio: what a
    reward model reads, being text-only (its head sits on the decoder, without the audio tower)."""
    messages = realtime_messages({"persona": persona, "history": list(history or ())})
    messages[-1] = {"role": "user", "content": user_text}
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
