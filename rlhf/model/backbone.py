"""The shared audio-language backbone: audio encoder -> projector -> Qwen2 decoder (Qwen2-Audio's).

The vocabulary adds audio-codec tokens `<|a0|>..<|aN-1|>` for the TTS and realtime modes. Checkpoints
use the hub's key layout, which transformers and vLLM both load: transformers 5.x's save_pretrained
writes a layout vLLM rejects (see `hub_state_dict`).
"""
from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from safetensors.torch import save_file

from speechrl.rlhf.core.fingerprint import fingerprint

log = logging.getLogger(__name__)

AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_BOS, AUDIO_EOS = "<|audio_bos|>", "<|audio_eos|>"
IM_START, IM_END, EOT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CODEC_END = "<|codec_end|>"  # ends a run of codec tokens (TTS / realtime replies)
SPECIAL_TOKENS = [EOT, IM_START, IM_END, AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS, CODEC_END]
CODEC_TOKEN = "<|a{}|>"
CODEC_TOKEN_RE = re.compile(r"^<\|a(\d+)\|>$")

# Qwen2-Audio's template, written out here because tiny backbones have no hub config to
# inherit it from; real checkpoints bring their own and it is kept.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'audio' %}{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class Backbone:
    """A loaded backbone: model, processor, and the ids that matter to rollouts and rewards."""

    model: torch.nn.Module
    processor: object  # Qwen2AudioProcessor
    path: Path

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def sample_rate(self) -> int:
        return self.processor.feature_extractor.sampling_rate

    @property
    def max_audio_seconds(self) -> float:
        fe = self.processor.feature_extractor
        return fe.n_samples / fe.sampling_rate

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IM_END)

    def audio_token_ids(self) -> list[int]:
        """Ids of the codec-token block, in codec order (`<|a0|>` first)."""
        vocab = self.tokenizer.get_vocab()
        found = sorted((int(m.group(1)), i) for t, i in vocab.items() if (m := CODEC_TOKEN_RE.match(t)))
        return [i for _, i in found]

    def is_audio_token(self, token_id: int) -> bool:
        token = self.tokenizer.convert_ids_to_tokens(int(token_id))
        return bool(token and CODEC_TOKEN_RE.match(token))


def hub_state_dict(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename transformers 5.x in-memory keys to the hub layout that vLLM and from_pretrained load.

    In memory: model.{audio_tower,multi_modal_projector,language_model}.*, lm_head.*
    On the hub: audio_tower.*, multi_modal_projector.*, language_model.model.*, language_model.lm_head.*
    Keys already in hub layout pass through, so real checkpoints' names are stable.
    """
    for name, tensor in named_tensors:
        if name.startswith("model.language_model."):
            name = "language_model.model." + name[len("model.language_model."):]
        elif name.startswith("model."):
            name = name[len("model."):]
        elif name.startswith("lm_head."):
            name = "language_model." + name
        yield name, tensor


def load_processor(path: str | Path):
    """A backbone directory's processor (tokenizer + feature extractor + chat template), no weights."""
    from transformers import AutoProcessor

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; not a backbone directory "
                                "(build one with `speechrl build-backbone OUT_DIR`)")
    processor = AutoProcessor.from_pretrained(path)
    if processor.chat_template is None:
        processor.chat_template = CHAT_TEMPLATE
    return processor


def load_backbone(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Backbone:
    """Load a Qwen2-Audio-style backbone directory (ours or a hub checkpoint) with its processor."""
    from transformers import Qwen2AudioForConditionalGeneration

    processor = load_processor(path)
    path = Path(path).expanduser()
    model = Qwen2AudioForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device)
    return Backbone(model=model, processor=processor, path=path)


def save_backbone(model: torch.nn.Module, processor, path: str | Path) -> Path:
    """Write config, hub-layout safetensors and processor files; loads in transformers and vLLM."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # from_pretrained and vLLM pick the model class from `architectures`; a config built by hand lacks it
    model.config.architectures = ["Qwen2AudioForConditionalGeneration"]
    model.config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    # contiguous + clone: safetensors refuses shared or strided storage
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in hub_state_dict(model.state_dict().items())}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    processor.save_pretrained(path)
    return path


def build_tokenizer(texts: list[str], *, vocab_size: int, num_codec_tokens: int):
    """A byte-level BPE learned from `texts`, plus Qwen2-Audio's special tokens and the codec block.

    Byte-level, so any text still encodes; merges learned on the corpus keep sequences short,
    which matters for a tiny model learning in minutes on a CPU.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    specials = SPECIAL_TOKENS + [CODEC_TOKEN.format(i) for i in range(num_codec_tokens)]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=EOT,
                                   additional_special_tokens=specials)
    fast.audio_token = AUDIO_TOKEN
    return fast


def build_tiny_backbone(out_dir: str | Path, texts: list[str], tiny, *, sample_rate: int = 16000,
                        whisper_dir: Optional[Path] = None) -> Path:
    """Write a randomly initialized tiny backbone (`tiny`: a TinyBackboneConfig) to `out_dir`; with
    `whisper_dir` (a converted Whisper, `tiny.audio_encoder`) its audio tower is that Whisper's encoder."""
    from transformers import (Qwen2AudioConfig, Qwen2AudioEncoderConfig, Qwen2AudioForConditionalGeneration,
                              Qwen2AudioProcessor, Qwen2Config, WhisperFeatureExtractor)

    from speechrl.rlhf.model.prompts import template_texts

    torch.manual_seed(tiny.seed)
    # the prompts' fixed text repeats in every example: learning its merges keeps prompts short
    texts = list(texts) + template_texts() * 50
    tokenizer = build_tokenizer(texts, vocab_size=tiny.text_vocab_size, num_codec_tokens=tiny.num_codec_tokens)
    chunk = tiny.max_audio_seconds
    if chunk * 100 % 4:
        raise ValueError(f"max_audio_seconds={chunk}: the window must be a multiple of 0.04 s "
                         "(the encoder halves 10 ms frames twice)")
    # chunk_length shortens Whisper's fixed 30 s window: the encoder runs on the padded window,
    # so 4 s instead of 30 s is ~7x less encoder work per clip.
    feature_extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=sample_rate,
                                                chunk_length=int(chunk) if float(chunk).is_integer() else chunk)
    processor = Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer,
                                    chat_template=CHAT_TEMPLATE)
    positions = int(round(chunk * 100)) // 2
    whisper = None
    if whisper_dir is not None:  # Whisper's encoder is Qwen2-Audio's tower (model/pretrained/backbone.py)
        from transformers import WhisperForConditionalGeneration

        from speechrl.rlhf.model.pretrained.whisper import tower_config

        whisper = WhisperForConditionalGeneration.from_pretrained(whisper_dir, dtype=torch.float32)
        audio_cfg = tower_config(whisper.config, positions)
    else:
        audio_cfg = Qwen2AudioEncoderConfig(
            num_mel_bins=80, encoder_layers=tiny.encoder_layers, encoder_attention_heads=tiny.num_heads,
            encoder_ffn_dim=tiny.encoder_dim * 4, d_model=tiny.encoder_dim, max_source_positions=positions)
    text_cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=tiny.hidden_size, intermediate_size=tiny.hidden_size * 2,
        num_hidden_layers=tiny.num_layers, num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids(EOT), eos_token_id=tokenizer.convert_tokens_to_ids(IM_END))
    config = Qwen2AudioConfig(audio_config=audio_cfg, text_config=text_cfg,
                              audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))
    config.tie_word_embeddings = False
    model = Qwen2AudioForConditionalGeneration(config)
    if whisper is not None:
        # the window's first positions of Whisper's 30 s (whisper.cpp's audio_ctx; load_whisper cuts the
        # judge's window the same way): every other weight loads as it is
        encoder = whisper.model.encoder.state_dict()
        encoder["embed_positions.weight"] = encoder["embed_positions.weight"][:positions].clone()
        model.model.audio_tower.load_state_dict(encoder, strict=True)
        del whisper
    model.generation_config.eos_token_id = text_cfg.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return save_backbone(model, processor, out_dir)


def text_token_ids(tokenizer) -> list[int]:
    """The ids of a text reply, the decoding constraint of ASR (vLLM sampling and the trainer's
    logprobs take the same list): no codec tokens, no audio placeholders or other specials except
    the end-of-turn. (An unconstrained tiny policy samples `<|AUDIO|>`, which no forward pass accepts.)"""
    specials = set(tokenizer.all_special_ids) | set(tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS))
    specials.discard(tokenizer.convert_tokens_to_ids(IM_END))
    return [i for t, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
            if i not in specials and not CODEC_TOKEN_RE.match(t)]


def codec_token_ids(tokenizer, num_codec_ids: Optional[int] = None) -> list[int]:
    """The ids of a spoken reply (TTS): the first `num_codec_ids` codec tokens of the block (the
    recipe's codec may use fewer than the backbone has; None = all), then `<|codec_end|>`."""
    vocab = tokenizer.get_vocab()
    block = sorted((int(m.group(1)), i) for t, i in vocab.items() if (m := CODEC_TOKEN_RE.match(t)))
    if num_codec_ids is not None and num_codec_ids > len(block):
        raise ValueError(f"the codec needs {num_codec_ids} codec tokens but the backbone has {len(block)}")
    return [i for _, i in block[:num_codec_ids]] + [tokenizer.convert_tokens_to_ids(CODEC_END)]


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def backbone_summary(backbone: Backbone) -> dict:
    return {"path": str(backbone.path), "parameters": count_parameters(backbone.model),
            "vocab": len(backbone.tokenizer), "codec_tokens": len(backbone.audio_token_ids()),
            "sample_rate": backbone.sample_rate, "max_audio_seconds": backbone.max_audio_seconds}


def default_tiny_dir(cache_dir: str, tiny) -> Path:
    """Cache path keyed by the tiny shape, so a changed shape never reuses a stale build (the tokenizer's
    texts are named by the caller: modes/assets.py)."""
    # a random encoder keeps the names given before `audio_encoder` existed, so caches stay valid
    key = "-".join(str(v) for k, v in vars(tiny).items()
                   if k != "texts" and not (k == "audio_encoder" and v == "random")).replace(".", "_")
    return Path(cache_dir).expanduser() / "backbones" / f"tiny-{key}"


def backbone_fingerprint(path: Path) -> str:
    """The weights and, where the directory has one, the tokenizer: what makes two backbones the same."""
    return fingerprint(*(p for p in (path / "model.safetensors", path / "tokenizer.json") if p.is_file()))


def ensure_tiny_backbone(cache_dir: str, tiny, texts_fn, sample_rate: int = 16000,
                         path: Optional[Path] = None) -> Path:
    from speechrl.rlhf.core.build_once import build_once

    path = path or default_tiny_dir(cache_dir, tiny)

    def build() -> None:
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)  # a killed build's leftovers
        whisper_dir = None
        if tiny.audio_encoder != "random":
            from speechrl.rlhf.model.pretrained.whisper import ensure_whisper

            whisper_dir = ensure_whisper(cache_dir, tiny.audio_encoder)
        build_tiny_backbone(tmp, texts_fn(), tiny, sample_rate=sample_rate, whisper_dir=whisper_dir)
        tmp.rename(path)  # atomic: a killed build never leaves a half-written backbone behind
        log.info("tiny backbone built into %s, fingerprint %s", path, backbone_fingerprint(path))

    # under the folder's lock: processes that start together (test workers, runs) build it once
    return build_once(path, lambda p: (p / "model.safetensors").is_file(), build)
