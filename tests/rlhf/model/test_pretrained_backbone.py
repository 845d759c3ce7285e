"""The small real backbone (Whisper tiny.en encoder + projector + SmolLM2) and the codec-token extension:
loads in transformers with every key, hears real audio, and speaks text exactly as SmolLM2 does."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
from speechrl.rlhf.model.backbone import (AUDIO_TOKEN, CODEC_END, CODEC_TOKEN, SPECIAL_TOKENS,  # noqa: E402
                                          load_backbone, load_processor)
from speechrl.rlhf.model.pretrained import smollm2, whisper  # noqa: E402
from speechrl.rlhf.model.pretrained.backbone import build_small_real_backbone, ensure_pretrained  # noqa: E402
from speechrl.rlhf.model.pretrained.codec_tokens import add_codec_tokens  # noqa: E402
from speechrl.rlhf.model.prompts import render_prompt  # noqa: E402

NUM_CODEC = 1024  # the recipes' block (ensure_pretrained's default): the e2e run on this backbone reuses this build
PROMPTS = ["The capital of France is",
           "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def cache(tiny_cache):
    try:
        smollm2.gguf_path(), whisper.wheel_parts("whisper-tiny.en")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return tiny_cache  # the tests' shared cache: built once for these tests and the e2e run


@pytest.fixture(scope="module")
def built(cache):
    start = time.perf_counter()
    path = build_small_real_backbone(cache, NUM_CODEC)
    print(f"small real backbone built (with Whisper and SmolLM2 conversions) in {time.perf_counter() - start:.1f} s")
    return path


@pytest.fixture(scope="module")
def real(built):
    return load_backbone(built)


def greedy(model, tokenizer, prompt: str, n: int = 12) -> list[int]:
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
    return out[0, ids.shape[1]:].tolist()


def test_builds_once_in_hub_layout_and_is_reused(built, cache):
    assert built.name == f"whisper-tiny.en+smollm2-135m-{NUM_CODEC}"
    config = json.loads((built / "config.json").read_text())
    assert config["architectures"] == ["Qwen2AudioForConditionalGeneration"]
    assert config["audio_config"]["max_source_positions"] == 1500 and config["audio_config"]["num_mel_bins"] == 80
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert ensure_pretrained("whisper-tiny.en+smollm2-135m", cache, NUM_CODEC) == built
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(built.parent.glob("*.partial*"))
    with pytest.raises(ValueError, match="known: whisper-tiny.en"):
        ensure_pretrained("qwen2-audio-70b", cache)


def test_loads_in_transformers_with_every_key(built):
    from transformers import Qwen2AudioForConditionalGeneration

    _, info = Qwen2AudioForConditionalGeneration.from_pretrained(built, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_tokenizer_has_specials_codec_block_and_smollm2_ids(real, cache):
    from transformers import TokenizersBackend

    tok, smol = real.tokenizer, TokenizersBackend.from_pretrained(smollm2.default_smollm2_dir(cache))
    for token in SPECIAL_TOKENS + [CODEC_END, CODEC_TOKEN.format(NUM_CODEC - 1)]:
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert len(real.audio_token_ids()) == NUM_CODEC
    assert real.model.config.audio_token_index == tok.convert_tokens_to_ids(AUDIO_TOKEN)
    assert real.model.get_input_embeddings().weight.shape[0] == len(tok)
    text = "Hello there, <|im_start|>user\nturn left<|im_end|>"
    assert tok(text)["input_ids"] == smol(text)["input_ids"]


@pytest.fixture(scope="module")
def speech(shared_data_dir):
    """(audio, rate): a real recording from ../shared/data where it is, else an espeak-ng sentence."""
    import soundfile as sf

    clip = shared_data_dir / "real_speech" / "cards" / "001.wav"
    if clip.is_file():
        audio, rate = sf.read(str(clip), dtype="float32")
        return audio, rate
    from speechrl.data.synth import synthesize

    return synthesize("Turn left at the next corner and stop by the red door."), 16000


def test_forward_on_real_speech_with_the_asr_prompt(real, speech):
    audio, rate = speech
    prompt = render_prompt(real.processor, "asr")
    assert AUDIO_TOKEN in prompt
    inputs = real.processor(text=[prompt], audio=[audio], sampling_rate=rate, return_tensors="pt")
    with torch.no_grad():
        logits = real.model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(real.tokenizer))
    assert torch.isfinite(logits).all()


def test_text_behaviour_equals_smollm2(real, cache):
    from transformers import Qwen2ForCausalLM

    smol = Qwen2ForCausalLM.from_pretrained(smollm2.default_smollm2_dir(cache)).eval()
    real.model.eval()
    for prompt in PROMPTS:
        expected = greedy(smol, real.tokenizer, prompt)
        assert len(set(expected)) > 1
        assert greedy(real.model, real.tokenizer, prompt) == expected, prompt


def test_add_codec_tokens_keeps_ids_and_greedy_text(real, tmp_path):
    """Any Qwen2-Audio checkpoint: 32 more codec tokens, mean-initialized, change no greedy text token."""
    out = add_codec_tokens(real.path, tmp_path / "more", NUM_CODEC + 32)
    extended = load_backbone(out)
    old, new = real.tokenizer.get_vocab(), extended.tokenizer.get_vocab()
    assert all(new[t] == i for t, i in old.items())
    assert len(new) == len(old) + 32 and len(extended.audio_token_ids()) == NUM_CODEC + 32
    emb = extended.model.get_input_embeddings().weight
    assert torch.allclose(emb[len(old):], emb[:len(old)].mean(0).expand(32, -1))
    extended.model.eval()
    for prompt in PROMPTS:
        assert greedy(extended.model, extended.tokenizer, prompt) == greedy(real.model, real.tokenizer, prompt)
    assert load_processor(out).chat_template == real.processor.chat_template


@pytest.mark.vllm
def test_loads_in_stock_vllm_and_matches_transformers(real, speech, monkeypatch):
    """Stock vLLM (no speechrl patch) loads the checkpoint; greedy tokens equal transformers', text and audio."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
    from vllm import LLM, SamplingParams

    audio, rate = speech
    prompt = render_prompt(real.processor, "asr")
    inputs = real.processor(text=[prompt], audio=[audio], sampling_rate=rate, return_tensors="pt")
    with torch.no_grad():
        out = real.model.generate(**inputs, do_sample=False, max_new_tokens=12)
    expected = [out[0, inputs["input_ids"].shape[1]:].tolist(), greedy(real.model, real.tokenizer, PROMPTS[1])]

    start = time.perf_counter()
    # on CPU a fixed KV cache, as RolloutEngine does: gpu_memory_utilization counts this test process's
    # memory against the node's, so it failed once earlier tests had grown the process to 3.7 GiB
    memory = {"gpu_memory_utilization": 0.3} if torch.cuda.is_available() else {"kv_cache_memory_bytes": 2**30}
    llm = LLM(model=str(real.path), dtype="float32", enforce_eager=True, max_model_len=2048,
              limit_mm_per_prompt={"audio": 1}, **memory)
    print(f"stock vLLM load: {time.perf_counter() - start:.1f} s")
    try:
        outs = llm.generate([{"prompt": prompt, "multi_modal_data": {"audio": (audio, rate)}}, PROMPTS[1]],
                            SamplingParams(temperature=0.0, max_tokens=12))
    finally:
        del llm
    assert [list(o.outputs[0].token_ids) for o in outs] == expected


def test_a_tiny_backbone_hears_through_whisper_tiny_encoder(cache, speech, tmp_path):
    """model.tiny.audio_encoder: the tower is Whisper's encoder cut to the 4 s window; the rest is tiny."""
    from dataclasses import replace

    from speechrl.rlhf.core.config import TinyBackboneConfig
    from speechrl.rlhf.model.backbone import default_tiny_dir, ensure_tiny_backbone

    plain = TinyBackboneConfig()
    tiny = replace(plain, audio_encoder="whisper-tiny.en")
    assert "whisper" not in default_tiny_dir(cache, plain).name, "a random encoder keeps its cache name"
    assert default_tiny_dir(cache, tiny) != default_tiny_dir(cache, plain)
    path = ensure_tiny_backbone(str(tmp_path), tiny, lambda: ["turn left", "stop here"], path=tmp_path / "tiny-whisper")
    backbone = load_backbone(path)
    w_model, w_processor = whisper.load_whisper(str(whisper.ensure_whisper(cache)), window_s=4)
    config = backbone.model.config
    assert config.audio_config.d_model == w_model.config.d_model == 384 and config.text_config.hidden_size == 256
    audio, rate = speech
    audio = whisper._resample(np.asarray(audio, dtype=np.float32), rate)[: 4 * 16000]
    ours = backbone.processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    theirs = w_processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    assert torch.equal(ours, theirs), "the same 4 s log-mel window"
    with torch.no_grad():
        a = backbone.model.model.audio_tower(ours, output_hidden_states=True).hidden_states
        b = w_model.model.encoder(theirs, output_hidden_states=True).hidden_states
    layers = w_model.config.encoder_layers
    assert torch.allclose(a[layers - 1], b[layers - 1], atol=1e-5), "Whisper's weights, position for position"
