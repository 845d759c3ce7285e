"""Prompt builders, one per operational mode, found by name.

A builder turns an example into chat messages; the backbone's chat template renders them.
TTS and realtime register theirs beside ASR's.
"""
from __future__ import annotations

from speechrl.rlhf.registry import Registry

PROMPT_BUILDERS: Registry = Registry("prompt builder")

ASR_INSTRUCTION = "Transcribe the audio."


@PROMPT_BUILDERS.register("asr")
def asr_messages(example=None) -> list[dict]:
    """One user turn: the audio, then the instruction. The reply is the transcript."""
    return [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": ASR_INSTRUCTION}]}]


def render_prompt(processor, mode: str, example=None) -> str:
    """The prompt text (audio placeholder unexpanded), ending where the model's reply starts."""
    messages = PROMPT_BUILDERS.get(mode)(example)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def template_texts(processor=None) -> list[str]:
    """The fixed text of every mode's prompts, so a tiny backbone's tokenizer learns it compactly."""
    return ["You are a helpful assistant.", "system", "user", "assistant", "Audio 1:", ASR_INSTRUCTION]
