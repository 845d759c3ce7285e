"""Prompt builders, one per operational mode, found by name.

A builder turns an example into chat messages; the backbone's chat template renders them.
TTS and realtime register theirs beside ASR's.
"""
from __future__ import annotations

from speechrl.rlhf.registry import Registry

PROMPT_BUILDERS: Registry = Registry("prompt builder")

ASR_INSTRUCTION = "Transcribe the audio."
TTS_INSTRUCTION = "Say:"
VOICE_INSTRUCTION = "Voice:"


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


def render_prompt(processor, mode: str, example=None) -> str:
    """The prompt text (audio placeholder unexpanded), ending where the model's reply starts."""
    messages = PROMPT_BUILDERS.get(mode)(example)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def template_texts(processor=None) -> list[str]:
    """The fixed text of every mode's prompts, so a tiny backbone's tokenizer learns it compactly."""
    return ["You are a helpful assistant.", "system", "user", "assistant", "Audio 1:", ASR_INSTRUCTION]
