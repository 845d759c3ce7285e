"""In-process generation with a transformers backbone: greedy transcripts (ASR evaluation and
judges) and codec-token synthesis (TTS evaluation in SFT and DPO). RL runs generate on their vLLM
engines instead (engine.py); this path needs no engine for a few held-out batches."""
from __future__ import annotations

import numpy as np
import torch

from speechrl.rlhf.model.backbone import text_token_ids
from speechrl.rlhf.model.prompts import render_prompt


@torch.no_grad()
def greedy_transcribe(model, processor, audios: list[np.ndarray], *, max_new_tokens: int = 48,
                      batch_size: int = 16) -> list[str]:
    tok = processor.tokenizer
    prompt = render_prompt(processor, "asr")
    allowed = set(text_token_ids(tok))
    vocab = model.get_output_embeddings().weight.shape[0]
    suppress = [i for i in range(vocab) if i not in allowed]
    was_training = model.training
    model.eval()
    side, tok.padding_side = tok.padding_side, "left"  # batched decoder-only generation pads on the left
    texts: list[str] = []
    try:
        for i in range(0, len(audios), batch_size):
            chunk = audios[i : i + batch_size]
            inputs = processor(text=[prompt] * len(chunk), audio=chunk, padding=True,
                               sampling_rate=processor.feature_extractor.sampling_rate, return_tensors="pt")
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, suppress_tokens=suppress)
            texts += tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = side
        model.train(was_training)
    return [t.strip() for t in texts]


@torch.no_grad()
def synthesize_ids(model, task, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
                   batch_size: int = 16) -> list[list[int]]:
    """Completions (codec token ids, ending with `<|codec_end|>` unless cut at the cap) from a
    transformers model, under the task's decoding constraint. The in-process path (SFT, DPO);
    RL runs synthesize on their vLLM engines instead."""
    tok = task.tokenizer
    vocab = model.get_output_embeddings().weight.shape[0]
    allowed = set(task.allowed_ids)
    suppress = [i for i in range(vocab) if i not in allowed]
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(chunk):  # left padding: decoder-only generation continues each row's end
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
            gen = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 max_new_tokens=max_new_tokens, suppress_tokens=suppress,
                                 eos_token_id=task.stop_ids, pad_token_id=tok.pad_token_id, **sampling)
            for row in gen[:, width:].tolist():
                end = row.index(task.stop_ids[0]) + 1 if task.stop_ids[0] in row else len(row)
                out.append(row[:end])
    finally:
        model.train(was_training)
    return out
