"""A small real backbone: Whisper tiny.en's encoder -> a new projector -> SmolLM2-135M, as Qwen2-Audio.

Qwen2-Audio's audio tower is the Whisper encoder (same modules, same keys) with a stride-2 average
pool before its final layer norm; the pool has no weights, so Whisper's encoder weights load into it
unchanged. The real 30 s window (80 mels, 3000 frames, 1500 positions) is kept, so the checkpoint is
a stock Qwen2-Audio that transformers and vLLM load with no schema patch. Only the projector
(encoder 384 -> decoder 576) is new, randomly initialized from a seed.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from speechrl.rlhf.core.config import PRETRAINED_BACKBONES
from speechrl.rlhf.model.backbone import CHAT_TEMPLATE, EOT, IM_END, save_backbone
from speechrl.rlhf.model.pretrained.codec_tokens import extend_vocabulary
from speechrl.rlhf.model.pretrained.smollm2 import ensure_smollm2
from speechrl.rlhf.model.pretrained.whisper import SAMPLE_RATE, ensure_whisper, tower_config

SMALL_REAL = "whisper-tiny.en+smollm2-135m"
PRETRAINED = PRETRAINED_BACKBONES  # the names `model.pretrained` takes (core checks recipes against them)
assert SMALL_REAL in PRETRAINED


def build_small_real_backbone_into(out_dir: Path, whisper_dir: Path, smollm2_dir: Path,
                                   num_codec_tokens: int, seed: int = 0) -> Path:
    """Assemble the backbone from the converted Whisper and SmolLM2 directories and write it."""
    from transformers import (Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor, Qwen2Config,
                              Qwen2ForCausalLM, TokenizersBackend, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration)

    whisper = WhisperForConditionalGeneration.from_pretrained(whisper_dir, dtype=torch.float32)
    w = whisper.config
    audio_cfg = tower_config(w)
    text_cfg = Qwen2Config(**{k: v for k, v in json.loads((smollm2_dir / "config.json").read_text()).items()
                              if k not in ("architectures", "model_type", "transformers_version")})
    # untied: transformers' Qwen2-Audio always has its own lm_head, while vLLM would tie it to the
    # embeddings when asked and ignore the saved head; two copies keep both engines the same model
    text_cfg.tie_word_embeddings = False
    tokenizer = TokenizersBackend.from_pretrained(smollm2_dir)  # as saved; see docs/pretrained.md
    config = Qwen2AudioConfig(audio_config=audio_cfg, text_config=text_cfg, audio_token_index=0)
    config.tie_word_embeddings = False
    torch.manual_seed(seed)  # the projector is the one randomly initialized part
    model = Qwen2AudioForConditionalGeneration(config).eval()
    smol = Qwen2ForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    inner = model.model
    inner.audio_tower.load_state_dict(whisper.model.encoder.state_dict(), strict=True)
    inner.language_model.load_state_dict(smol.model.state_dict(), strict=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(smol.get_output_embeddings().weight)
    del whisper, smol

    feature_extractor = WhisperFeatureExtractor(feature_size=w.num_mel_bins, sampling_rate=SAMPLE_RATE)
    extend_vocabulary(model, tokenizer, num_codec_tokens)  # speechrl's specials, then the codec block
    processor = Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer,
                                    chat_template=CHAT_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    model.config.text_config.eos_token_id = ids(IM_END)
    model.generation_config.eos_token_id = ids(IM_END)
    model.generation_config.pad_token_id = ids(EOT)
    return save_backbone(model, processor, out_dir)


def default_pretrained_dir(cache_dir: str | Path, name: str, num_codec_tokens: int) -> Path:
    return Path(cache_dir).expanduser() / "pretrained" / f"{name}-{num_codec_tokens}"


def build_small_real_backbone(cache_dir: str | Path, num_codec_tokens: int = 1024) -> Path:
    """`<cache_dir>/pretrained/whisper-tiny.en+smollm2-135m-<N>/`, built on first use from the
    Whisper and SmolLM2 wheels (converted into the same cache) and reused after. The build goes to a
    private `.partial-*` folder renamed into place, so a killed build leaves nothing half-written."""
    path = default_pretrained_dir(cache_dir, SMALL_REAL, num_codec_tokens)
    if (path / "model.safetensors").is_file():
        return path
    whisper_dir, smollm2_dir = ensure_whisper(cache_dir, "whisper-tiny.en"), ensure_smollm2(cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.partial-", dir=path.parent))
    try:
        build_small_real_backbone_into(tmp, whisper_dir, smollm2_dir, num_codec_tokens)
        os.rename(tmp, path)
    except OSError:
        if not (path / "model.safetensors").is_file():  # not merely a concurrent build that won
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_pretrained(name: str, cache_dir: str | Path, num_codec_tokens: int = 1024) -> Path:
    """The pretrained backbone called `name` (`model.pretrained`), built once into the cache."""
    if name not in PRETRAINED:
        raise ValueError(f"model.pretrained={name!r} is not a known pretrained backbone; known: "
                         f"{', '.join(PRETRAINED)}")
    return build_small_real_backbone(cache_dir, num_codec_tokens)
