"""Held-out evaluation: greedy transcripts from the policy, scored as corpus WER/CER."""
from __future__ import annotations

import numpy as np

from speechrl.rewards.asr import char_error_rate, word_error_rate
from speechrl.rollouts.local import greedy_transcribe


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
