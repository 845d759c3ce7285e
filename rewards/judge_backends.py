"""Where an LLM judge runs: vLLM or transformers in process, or an OpenAI-compatible server.

Backends answer `next_logprobs` (the wanted tokens' logprobs, e.g. rating digits: local backends read
them exactly, a server's top-k may miss some, which are then absent) and `generate` (greedy rationale).
`ensure_tiny_judge` builds a random tiny judge so tests run the real paths offline; its scores mean nothing.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from speechrl.rewards.judge_cache import cache_key
from speechrl.rlhf.core.build_once import build_once

log = logging.getLogger(__name__)

TINY_JUDGE_VERSION = 1  # bump when the tiny judge's build changes, so cached ones are rebuilt


def token_matches(text: str, wanted: frozenset[str], at_start: bool) -> Optional[str]:
    """The wanted string a token's text stands for, or None.

    At the answer's start a token may carry leading whitespace ("3" or " 3", by tokenizer); a token
    continuing an answer ("0" after "1" in "10") may not. Trailing whitespace ends the answer.
    """
    if not at_start and text[:1].isspace():
        return None
    core = (text.lstrip() if at_start else text).rstrip()
    return core if core in wanted else None


def model_fingerprint(path: Path) -> str:
    """What identifies a local judge for the score cache: its config and its weight files' names,
    sizes and modification times (hashing gigabytes of weights at every start would be too slow)."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json", ".model"))
    return cache_key(str(path.resolve()), [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])[:16]


class _LocalJudge:
    """What the two in-process backends share: the tokenizer's token texts, and the chat template."""

    continues = True  # an answer can be continued from the prompt's text ("1" into "10"; "4\nReason:")

    def __init__(self, path: str, chat_template: bool):
        self.path = Path(path).expanduser()
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"persona judge: {self.path} holds no config.json; point `model` at a local "
                                    "model directory (save_pretrained), or set `endpoint` to a server's URL")
        self.chat_template = chat_template
        self.fingerprint = model_fingerprint(self.path)
        self.calls = 0  # forward passes asked of the model (batches), for tests and logs
        self._texts: Optional[list[str]] = None
        self._candidates: dict[tuple[frozenset[str], bool], list[int]] = {}

    def format(self, body: str, cue: str) -> str:
        """The prompt text: `body` then `cue`, or with chat_template the body as the user's message
        and the cue opening the assistant's turn."""
        if not self.chat_template:
            return body + cue
        messages = [{"role": "user", "content": body}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + cue

    def candidates(self, wanted: frozenset[str], at_start: bool) -> list[int]:
        """Ids of the tokens that stand for a wanted string (all spellings: "3", " 3", ...)."""
        key = (wanted, at_start)
        if key not in self._candidates:
            if self._texts is None:
                self._texts = [self.tokenizer.decode([i]) for i in range(len(self.tokenizer))]
            ids = [i for i, text in enumerate(self._texts) if token_matches(text, wanted, at_start)]
            if not ids:
                raise ValueError(f"persona judge: no token of {self.path}'s tokenizer spells any of {sorted(wanted)}")
            self._candidates[key] = ids
        return self._candidates[key]

    def _pick(self, ids: list[int], logprobs: list[float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, lp in zip(ids, logprobs):
            text = self._texts[i]
            out[text] = lp if text not in out else float(np.logaddexp(out[text], lp))
        return out


class VllmJudge(_LocalJudge):
    """An in-process vLLM engine on a local model directory (VLLM_ENABLE_V1_MULTIPROCESSING=0, so
    it also lives inside a Ray reward worker). Temperature 0; rating tokens are read with
    `logprob_token_ids`, i.e. from the raw (unprocessed) next-token distribution."""

    def __init__(self, path: str, *, chat_template: bool = False, max_model_len: int = 4096,
                 kv_cache_gib: float = 0.25, gpu_memory_utilization: float = 0.3, threads: int = 0, seed: int = 0):
        super().__init__(path, chat_template)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import torch
        from vllm import LLM

        from speechrl.rollouts.vllm_setup import eager_helpers_on_cpu, guard_vllm_module_scan, quiet_benign_vllm_warnings

        guard_vllm_module_scan()
        eager_helpers_on_cpu()  # the engine below is eager on CPU
        on_gpu = torch.cuda.is_available()
        if not on_gpu and threads > 0:
            torch.set_num_threads(threads)  # before LLM(): vLLM's CPU worker forbids it afterwards
        # on CPU, gpu_memory_utilization is a fraction of host memory and fails at start-up; a fixed size works
        memory = {"gpu_memory_utilization": gpu_memory_utilization} if on_gpu else \
            {"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)}
        quiet_benign_vllm_warnings()
        self.llm = LLM(model=str(self.path), dtype="auto" if on_gpu else "float32", enforce_eager=not on_gpu,
                       max_model_len=max_model_len, seed=seed, **memory)
        self.tokenizer = self.llm.get_tokenizer()

    def next_logprobs(self, prompts: list[str], wanted: frozenset[str], at_start: bool) -> list[dict[str, float]]:
        from vllm import SamplingParams

        ids = self.candidates(wanted, at_start)
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=ids, detokenize=False)
        self.calls += 1
        outputs = self.llm.generate([{"prompt": p} for p in prompts], params, use_tqdm=False)
        return [self._pick(ids, [out.outputs[0].logprobs[0][i].logprob for i in ids]) for out in outputs]

    def generate(self, prompts: list[str], max_tokens: int) -> list[str]:
        from vllm import SamplingParams

        self.calls += 1
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=["\n"])
        return [out.outputs[0].text for out in self.llm.generate([{"prompt": p} for p in prompts], params,
                                                                 use_tqdm=False)]


class TransformersJudge(_LocalJudge):
    """The same judge through transformers, in float32, one prompt per forward pass: the reference
    the vLLM and server paths are checked against, and a fallback where vLLM is not installed."""

    def __init__(self, path: str, *, chat_template: bool = False, device: str = "auto"):
        super().__init__(path, chat_template)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).to(self.device).eval()

    def full_logprobs(self, prompt: str):
        """log_softmax of the next-token logits after `prompt` (a 1-D tensor over the vocabulary)."""
        import torch

        ids = self.tokenizer(prompt, return_tensors="pt").input_ids.to(self.device)
        with torch.inference_mode():
            # the last position's logits only: the vocabulary projection of every other position is a
            # fifth of SmolLM2's forward on a persona card's few hundred tokens, and unused
            return self.model(ids, logits_to_keep=1).logits[0, -1].float().log_softmax(-1).cpu()

    def next_logprobs(self, prompts: list[str], wanted: frozenset[str], at_start: bool) -> list[dict[str, float]]:
        ids = self.candidates(wanted, at_start)
        self.calls += 1
        return [self._pick(ids, self.full_logprobs(p)[ids].tolist()) for p in prompts]

    def generate(self, prompts: list[str], max_tokens: int) -> list[str]:
        import torch

        self.calls += 1
        texts = []
        for p in prompts:
            ids = self.tokenizer(p, return_tensors="pt").input_ids.to(self.device)
            with torch.inference_mode():
                out = self.model.generate(ids, max_new_tokens=max_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)
            texts.append(self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0])
        return texts


# --- the tiny judge -----------------------------------------------------------------------------------
def ensure_tiny_judge(cache_dir: str | Path = "~/.cache/speechrl") -> Path:
    """A tiny randomly initialized Qwen2 causal LM with a byte-level BPE tokenizer (digits and
    letters are tokens of their own), written once to `<cache_dir>/judges/persona-tiny-v<N>` and
    reused. It loads in vLLM (head_dim 64, as CPU attention needs) and in transformers. It has
    learned nothing: its ratings are noise, good for exercising code paths only."""
    path = Path(cache_dir).expanduser() / "judges" / f"persona-tiny-v{TINY_JUDGE_VERSION}"

    def build() -> None:  # reward workers starting together build it once
        tmp = path.with_name(path.name + ".partial")
        _build_tiny_judge(tmp)
        tmp.rename(path)  # atomic: a killed build never leaves a half-written judge behind

    return build_once(path, lambda p: (p / "model.safetensors").is_file(), build)


def _build_tiny_judge(out: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from speechrl.data.builtin_personas import builtin_personas
    from speechrl.data.personas import render
    from speechrl.rlhf.model.backbone import CHAT_TEMPLATE, EOT, IM_END, build_tokenizer
    from speechrl.rewards.persona_prompts import DEFAULT_RUBRIC

    torch.manual_seed(0)
    texts = [render(c) for c in builtin_personas()] + [DEFAULT_RUBRIC] + [f"Rating: {k}" for k in range(1, 11)]
    tokenizer = build_tokenizer(texts * 5, vocab_size=512, num_codec_tokens=0)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=tokenizer.convert_tokens_to_ids(EOT),
                         eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
                         pad_token_id=tokenizer.pad_token_id)
    config.architectures = ["Qwen2ForCausalLM"]
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
