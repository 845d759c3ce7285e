"""Held-out evaluation: greedy transcripts from the policy, scored as corpus WER/CER."""
from __future__ import annotations

import numpy as np
import torch

from speechrl.data.prompts import render_prompt
from speechrl.rlhf.backbone import allowed_token_ids
from speechrl.rewards.asr import char_error_rate, word_error_rate


@torch.no_grad()
def greedy_transcribe(model, processor, audios: list[np.ndarray], *, mode: str = "asr",
                      max_new_tokens: int = 48, batch_size: int = 16) -> list[str]:
    tok = processor.tokenizer
    prompt = render_prompt(processor, mode)
    allowed = set(allowed_token_ids(tok, mode))
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


def log_examples(result: dict, log) -> dict:
    """Log (and drop from `result`) the few ref/hyp pairs kept for eyeballing; returns the metrics."""
    for ref, hyp in result.pop("examples"):
        log.info("eval  ref: %s\n      hyp: %s", ref, hyp)
    return result


def evaluate_asr(model, processor, dataset, *, max_examples: int, max_new_tokens: int) -> dict:
    """Mean WER/CER over the first `max_examples` held-out clips, plus a few examples to eyeball."""
    items = [dataset[i] for i in range(min(len(dataset), max_examples))]
    hyps = greedy_transcribe(model, processor, [a for _, a in items], max_new_tokens=max_new_tokens)
    refs = [ex.text for ex, _ in items]
    wer = float(np.mean([word_error_rate(h, r) for h, r in zip(hyps, refs)]))
    cer = float(np.mean([char_error_rate(h, r) for h, r in zip(hyps, refs)]))
    return {"eval/wer": wer, "eval/cer": cer, "examples": list(zip(refs[:3], hyps[:3]))}
