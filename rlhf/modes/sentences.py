"""Everyday English sentences written by SmolLM2 itself, for a real model's speech corpus.

The command grammar (33 words) teaches a tiny model ASR in minutes, but a real decoder trained on it
learns to answer every clip with a command. No sentence corpus ships on PyPI that we may use, so the
decoder writes its own: one short sentence per (topic, style) prompt, sampled from a seed, kept only
when it is plain words a synthesizer reads one way (no digits, symbols or abbreviations).
Built once into `<cache_dir>/pretrained/sentences-<n>-<seed>.txt`, one sentence a line.
"""
from __future__ import annotations

import logging
import os
import random
import re
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_TOPICS = (
    "the weather", "a kitchen", "breakfast", "a train station", "a garden", "a library", "the ocean",
    "a birthday party", "a mountain walk", "a small dog", "a cat", "a bicycle", "the city at night",
    "a school", "a football match", "a market", "an old house", "a river", "winter", "summer",
    "a rainy day", "a doctor", "a farmer", "a musician", "a painter", "a letter", "a phone call",
    "a long journey", "a hotel", "a museum", "a forest", "the moon", "a storm", "a family dinner",
    "a new job", "a friend", "a teacher", "a bakery", "coffee", "a car", "a bus", "an airport",
    "a holiday", "a wedding", "a hospital", "a newspaper", "a story", "a song", "a game", "a shop",
    "money", "a bridge", "a village", "the sea", "a boat", "a horse", "a bird", "flowers", "trees",
    "a meeting", "an office", "a computer", "a book", "a film", "the news", "a lake", "a park",
    "a kitchen table", "a window", "the morning", "the evening", "a hat", "shoes", "a coat",
    "a picnic", "a festival", "a neighbour", "a brother", "a sister", "a grandmother", "a child",
    "a king", "a queen", "a soldier", "a ship", "a castle", "an island", "a desert", "snow", "rain",
    "fire", "bread", "apples", "tea", "a restaurant", "a clock", "a bell", "a road", "a map",
)
_STYLES = (
    "Write one short sentence about {t}.",
    "Write one simple sentence someone might say about {t}.",
    "Ask one short question about {t}.",
    "Describe {t} in one sentence.",
    "Write one sentence from a story about {t}.",
)
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "prof"}
_PLAIN = re.compile(r"[A-Za-z][A-Za-z ,;'-]*[.?!]")


def clean_sentence(text: str, min_words: int = 4, max_words: int = 18) -> str | None:
    """The reply's first sentence when it is plain words and punctuation of a sane length, else None."""
    first = re.split(r"(?<=[.?!])\s", text.strip().replace("\n", " "), maxsplit=1)[0].strip().strip('"')
    if not _PLAIN.fullmatch(first) or not min_words <= len(first.split()) <= max_words:
        return None
    if first.split()[-1].rstrip(".?!").lower() in _ABBREVIATIONS:  # "A family friend, Mr." was cut short
        return None
    return first


def generate_sentences(model_dir: Path, n: int, seed: int = 0, batch_size: int = 512) -> list[str]:
    """`n` distinct sentences sampled from the chat model in `model_dir` (a SmolLM2 folder), on an
    in-process vLLM engine: transformers' generate took 2 s a sentence on 2 cores, vLLM far less."""
    import os

    import torch
    from tqdm import tqdm
    from transformers import TokenizersBackend

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from speechrl.rollouts.vllm_setup import eager_helpers_on_cpu, quiet_benign_vllm_warnings

    eager_helpers_on_cpu()
    tok = TokenizersBackend.from_pretrained(model_dir)  # the chat template, as saved
    quiet_benign_vllm_warnings()
    memory = {} if torch.cuda.is_available() else {"kv_cache_memory_bytes": 2**30}
    llm = LLM(model=str(model_dir), dtype="auto" if torch.cuda.is_available() else "float32", enforce_eager=True,
              max_model_len=256, seed=seed, **memory)
    rng = random.Random(seed)
    seen, out, attempts = set(), [], 0
    with tqdm(total=n, desc="writing sentences", unit="sent", disable=None) as bar:
        while len(out) < n:
            if attempts > 20 * n:
                raise RuntimeError(f"only {len(out)} usable sentences from {attempts} samples of {model_dir}")
            prompts = [tok.apply_chat_template([{"role": "user", "content": rng.choice(_STYLES).format(
                t=rng.choice(_TOPICS))}], tokenize=False, add_generation_prompt=True) for _ in range(batch_size)]
            # the engine's seed alone: per-request seeds fail on CPU when vLLM splits a long prefill
            params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=40)
            attempts += batch_size
            for result in llm.generate(prompts, params, use_tqdm=False):
                s = clean_sentence(result.outputs[0].text)
                if s and s.lower() not in seen and len(out) < n:
                    seen.add(s.lower())
                    out.append(s)
                    bar.update(1)
            log.info("sentences: %d of %d kept from %d samples", len(out), n, attempts)  # a log's progress bar
    log.info("%d sentences kept from %d samples", len(out), attempts)
    del llm
    return out


def ensure_sentences(cache_dir: str | Path, n: int = 2000, seed: int = 0) -> Path:
    """The sentence file, written once (atomically) and reused."""
    from speechrl.rlhf.model.pretrained.smollm2 import ensure_smollm2

    path = Path(cache_dir).expanduser() / "pretrained" / f"sentences-{n}-{seed}.txt"
    if path.is_file():
        return path
    sentences = generate_sentences(ensure_smollm2(cache_dir), n, seed)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".partial-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(sentences) + "\n")
    os.replace(tmp, path)
    return path
