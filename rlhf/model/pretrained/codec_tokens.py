"""Append the codec-token block (and speechrl's special tokens) to any Qwen2-Audio-layout checkpoint.

New embedding and LM-head rows are the mean of the existing rows. A new token's logit is then the
mean of the existing tokens' logits, which is below their maximum whenever they are not all equal,
so greedy decoding of text is unchanged token for token (the test measures it). Sampling shifts a
little probability mass onto the new tokens until training moves them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from speechrl.rlhf.model.backbone import AUDIO_TOKEN, CODEC_TOKEN, SPECIAL_TOKENS, load_processor, save_backbone


def extend_vocabulary(model, tokenizer, num_codec_tokens: int) -> list[str]:
    """Add the special tokens and `<|a0|>`..`<|aN-1|>` the tokenizer lacks, in place; mean-initialize
    their rows in the embeddings and the LM head. Returns the tokens added."""
    vocab = tokenizer.get_vocab()
    wanted = SPECIAL_TOKENS + [CODEC_TOKEN.format(i) for i in range(num_codec_tokens)]
    new, old_len = [t for t in wanted if t not in vocab], len(tokenizer)
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed.weight.data_ptr() == head.weight.data_ptr():
        raise ValueError("tied input/output embeddings: untie them (text_config.tie_word_embeddings=false) "
                         "first; vLLM and transformers disagree on tying for Qwen2-Audio")
    if len(tokenizer) > embed.weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    # new ids may also land on a hub checkpoint's padding rows (Qwen2-Audio-7B has ~4k): set them too
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weight[old_len:len(tokenizer)] = weight[:old_len].mean(dim=0)
    # resize_token_embeddings updates text_config.vocab_size; the placeholder id may be new
    model.config.text_config.vocab_size = model.get_input_embeddings().weight.shape[0]
    model.config.audio_token_index = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    tokenizer.audio_token = AUDIO_TOKEN
    return new


def add_codec_tokens(src_dir: str | Path, out_dir: str | Path, num_codec_tokens: int) -> Path:
    """`src_dir` (a Qwen2-Audio-layout checkpoint: ours or a hub one) with the codec block appended,
    written to `out_dir` in the hub key layout."""
    from transformers import Qwen2AudioForConditionalGeneration

    if num_codec_tokens < 1:
        raise ValueError(f"num_codec_tokens={num_codec_tokens}: add at least one codec token")
    processor = load_processor(src_dir)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(Path(src_dir).expanduser(), dtype=torch.float32)
    extend_vocabulary(model, processor.tokenizer, num_codec_tokens)
    return save_backbone(model, processor, out_dir)
