"""The tiny backbone: hub key layout on disk, exact round trip, codec-token block, vLLM parity."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from speechrl.rlhf.model.backbone import (CODEC_TOKEN, backbone_summary, build_tiny_backbone, count_parameters,
                                    hub_state_dict, load_backbone, save_backbone)

HUB_PREFIXES = ("audio_tower.", "multi_modal_projector.", "language_model.model.", "language_model.lm_head.")
TEXTS = ["turn left", "go forward three meters", "pick up the red box", "stop and turn right"] * 20


def safetensors_keys(path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return list(f.keys())


def hub_keys_of(model) -> dict[str, torch.Tensor]:
    return dict(hub_state_dict(model.state_dict().items()))


@pytest.fixture(scope="module")
def small(small_backbone_dir):
    return load_backbone(small_backbone_dir)


def test_checkpoint_keys_are_in_hub_layout(small_backbone_dir):
    keys = safetensors_keys(small_backbone_dir)
    assert keys and all(k.startswith(HUB_PREFIXES) for k in keys), [k for k in keys if not k.startswith(HUB_PREFIXES)]
    for prefix in HUB_PREFIXES:
        assert any(k.startswith(prefix) for k in keys), f"no {prefix}* keys"
    # transformers 5.x's own save_pretrained nests the decoder one level too deep; vLLM rejects that
    assert not any(k.startswith("language_model.model.model.") for k in keys)
    assert "language_model.lm_head.weight" in keys
    config = json.loads((small_backbone_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2AudioForConditionalGeneration"]


def test_load_round_trip_is_exact(small, tmp_path):
    on_disk = load_file(str(small.path / "model.safetensors"))
    in_memory = hub_keys_of(small.model)
    assert set(on_disk) == set(in_memory)
    for name, tensor in on_disk.items():
        assert torch.equal(tensor, in_memory[name]), name
    # and save -> load again changes nothing
    again = load_backbone(save_backbone(small.model, small.processor, tmp_path / "again"))
    for name, tensor in hub_keys_of(again.model).items():
        assert torch.equal(tensor, in_memory[name]), name
    assert again.tokenizer.get_vocab() == small.tokenizer.get_vocab()


def test_hub_state_dict_renames_and_is_idempotent():
    t = torch.zeros(1)
    memory = ["model.audio_tower.conv1.weight", "model.multi_modal_projector.linear.bias",
              "model.language_model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    hub = [n for n, _ in hub_state_dict((n, t) for n in memory)]
    assert hub == ["audio_tower.conv1.weight", "multi_modal_projector.linear.bias",
                   "language_model.model.layers.0.mlp.up_proj.weight", "language_model.lm_head.weight"]
    assert [n for n, _ in hub_state_dict((n, t) for n in hub)] == hub


def test_audio_token_ids_are_the_codec_block(small, small_tiny):
    ids = small.audio_token_ids()
    assert len(ids) == small_tiny.num_codec_tokens
    assert ids == list(range(ids[0], ids[0] + len(ids))), "contiguous, in codec order"
    assert small.tokenizer.convert_ids_to_tokens(ids[0]) == CODEC_TOKEN.format(0)
    assert small.tokenizer.convert_ids_to_tokens(ids[-1]) == CODEC_TOKEN.format(len(ids) - 1)
    assert all(small.is_audio_token(i) for i in ids)
    text_ids = small.tokenizer("go forward three meters", add_special_tokens=False)["input_ids"]
    for i in [*text_ids, small.eos_token_id, small.tokenizer.pad_token_id, ids[0] - 1]:
        assert not small.is_audio_token(i)
    if ids[-1] + 1 < len(small.tokenizer):
        assert not small.is_audio_token(ids[-1] + 1)
    # the model can emit every codec token
    assert small.model.get_output_embeddings().weight.shape[0] >= ids[-1] + 1


def test_codec_tokens_encode_as_single_ids(small):
    ids = small.audio_token_ids()
    encoded = small.tokenizer(CODEC_TOKEN.format(5) + CODEC_TOKEN.format(0), add_special_tokens=False)["input_ids"]
    assert encoded == [ids[5], ids[0]]


def test_summary_reports_the_shape(small, small_tiny):
    s = backbone_summary(small)
    assert s["codec_tokens"] == small_tiny.num_codec_tokens
    assert s["sample_rate"] == 16000
    assert s["max_audio_seconds"] == pytest.approx(small_tiny.max_audio_seconds)
    assert s["parameters"] == count_parameters(small.model)


def test_default_tiny_backbone_has_a_few_million_parameters(tmp_path):
    from speechrl.rlhf.core.config import TinyBackboneConfig

    tiny = TinyBackboneConfig()
    backbone = load_backbone(build_tiny_backbone(tmp_path / "default", TEXTS, tiny))
    n = count_parameters(backbone.model)
    assert 1_000_000 < n < 20_000_000, n
    assert len(backbone.audio_token_ids()) == tiny.num_codec_tokens
    lm = backbone.model.config.text_config
    assert (lm.hidden_size, lm.num_hidden_layers, lm.num_attention_heads) == (256, 4, 4)
    assert lm.vocab_size == len(backbone.tokenizer)


def test_build_is_seeded(tmp_path, small_tiny):
    a = load_file(str(build_tiny_backbone(tmp_path / "a", TEXTS, small_tiny) / "model.safetensors"))
    b = load_file(str(build_tiny_backbone(tmp_path / "b", TEXTS, small_tiny) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_audio_window_must_fit_the_encoder(tmp_path, small_tiny):
    from dataclasses import replace

    with pytest.raises(ValueError, match="max_audio_seconds"):
        build_tiny_backbone(tmp_path / "odd", TEXTS, replace(small_tiny, max_audio_seconds=1.01))


def test_load_backbone_names_a_non_backbone_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_backbone(tmp_path)


def _hub_name(memory_name: str) -> str:
    """The published Qwen2-Audio checkpoints' key layout, written out independently of hub_state_dict."""
    for memory, hub in (("model.audio_tower.", "audio_tower."),
                        ("model.multi_modal_projector.", "multi_modal_projector."),
                        ("model.language_model.", "language_model.model."),
                        ("lm_head.", "language_model.lm_head.")):
        if memory_name.startswith(memory):
            return hub + memory_name[len(memory):]
    raise AssertionError(f"unexpected key {memory_name}")


def test_foreign_hub_layout_checkpoint_loads(small, tmp_path):
    """A checkpoint written by other code in the hub layout (as Qwen/Qwen2-Audio-7B ships) loads."""
    from transformers import Qwen2AudioForConditionalGeneration

    torch.manual_seed(123)
    foreign = Qwen2AudioForConditionalGeneration(small.model.config)  # fresh weights, not ours
    tensors = {_hub_name(k): v.contiguous().clone() for k, v in foreign.state_dict().items()}
    out = tmp_path / "foreign"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    foreign.config.save_pretrained(out)
    small.processor.save_pretrained(out)

    loaded = load_backbone(out)
    got = loaded.model.state_dict()
    for name, tensor in foreign.state_dict().items():
        assert torch.equal(got[name], tensor), name
    assert not torch.equal(got["lm_head.weight"], small.model.state_dict()["lm_head.weight"])
    assert loaded.audio_token_ids() == small.audio_token_ids()


def test_transformers_own_save_pretrained_loads(small, tmp_path):
    small.model.save_pretrained(tmp_path / "hf")
    small.processor.save_pretrained(tmp_path / "hf")
    loaded = load_backbone(tmp_path / "hf")
    ref = small.model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, ref[name]), name


def _clip(shared_data_dir) -> np.ndarray:
    from speechrl.data.audio import load_audio
    from speechrl.data.synth import synthesize

    cards = shared_data_dir / "real_speech" / "cards" / "001.wav" if shared_data_dir else None
    if cards is not None and cards.is_file():
        return load_audio(cards, 16000, max_seconds=4.0)
    return synthesize("go forward three meters")


@pytest.fixture(scope="module")
def speech(request) -> np.ndarray:
    try:
        shared = request.getfixturevalue("shared_data")
    except pytest.skip.Exception:
        shared = None  # no real recordings here: synthesized speech will do
    return _clip(shared)


@pytest.mark.vllm
def test_saved_backbone_greedy_matches_in_vllm(small, speech):
    """What save_backbone writes loads in vLLM, and greedy decoding agrees with transformers."""
    from speechrl.rlhf.model.prompts import render_prompt
    from speechrl.rollouts.engine import RolloutEngine
    from speechrl.rollouts.types import RolloutRequest

    assert len(speech) / 16000 <= small.max_audio_seconds
    prompt = render_prompt(small.processor, "asr")
    inputs = small.processor(text=[prompt], audio=[speech], sampling_rate=16000, return_tensors="pt")
    small.model.eval()
    with torch.no_grad():
        out = small.model.generate(**inputs, do_sample=False, max_new_tokens=16)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()

    engine = RolloutEngine(str(small.path), kv_cache_gib=0.25, max_model_len=512)
    try:
        [sample] = engine.generate([RolloutRequest(prompt=prompt, audio=speech, sample_rate=16000)],
                                   n=1, temperature=0.0, top_p=1.0, max_new_tokens=16)
    finally:
        del engine
    assert sample.prompt_ids == inputs["input_ids"][0].tolist()
    assert len(set(expected)) > 1, "a degenerate greedy output would hide weight mismatches"
    assert sample.completion_ids == expected
