"""The policy side shared by SFT and RL: token batches, per-token logprobs, the optimizer.

Token in, token out: a batch is built from prompt ids (the audio placeholder already
expanded, exactly as vLLM saw them) and completion ids, never re-tokenized from text.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from speechrl.rlhf.optim import Optimizer


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [B, L] prompt + completion, right-padded
    attention_mask: torch.Tensor  # [B, L]
    input_features: torch.Tensor  # [B, mel, frames] log-mel of each example's audio
    feature_attention_mask: torch.Tensor  # [B, frames]
    completion_mask: torch.Tensor  # [B, L-1] True where the next token is a completion token



def audio_features(processor, audios: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    fe = processor.feature_extractor
    out = fe(audios, sampling_rate=fe.sampling_rate, padding="max_length", return_attention_mask=True,
             return_tensors="pt")
    return out["input_features"], out["attention_mask"]


def prompt_ids_for(processor, prompt: str, audio: np.ndarray) -> list[int]:
    """Prompt ids with `<|AUDIO|>` expanded to this clip's length (what vLLM produces too)."""
    out = processor(text=[prompt], audio=[audio], sampling_rate=processor.feature_extractor.sampling_rate)
    return list(out["input_ids"][0])


def build_token_batch(processor, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                      audios: list[np.ndarray], pad_id: int) -> TokenBatch:
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    comp = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids[i, : len(p) + len(c)] = torch.tensor(list(p) + list(c))
        attn[i, : len(p) + len(c)] = 1
        # position t predicts token t+1: completion tokens sit at len(p) .. len(p)+len(c)-1
        comp[i, len(p) - 1 : len(p) + len(c) - 1] = True
    feats, feat_mask = audio_features(processor, audios)
    return TokenBatch(ids, attn, feats, feat_mask, comp)


def vocab_mask(allowed_ids: list[int], vocab_size: int) -> torch.Tensor:
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[torch.tensor(allowed_ids)] = True
    return mask


def token_logprobs(model, batch: TokenBatch, temperature: float = 1.0,
                   allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log p(token_{t+1} | <= t) for every position, [B, L-1]; read it where completion_mask is True.

    Logits are divided by the sampling temperature so the result is the logprob of the
    distribution the rollout actually sampled from (vLLM reports the same, see rollouts/engine.py).
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   input_features=batch.input_features,
                   feature_attention_mask=batch.feature_attention_mask).logits[:, :-1].float()
    if allowed is not None:  # the decoding constraint, applied as vLLM applies allowed_token_ids
        logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    if temperature != 1.0:
        logits = logits / temperature
    # gather-then-logsumexp: avoids materializing a full [B, L, V] log_softmax copy
    picked = logits.gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    logp = picked - torch.logsumexp(logits, dim=-1)
    # prompt positions hold tokens outside the constraint (e.g. <|AUDIO|>): -inf there would turn
    # masked sums into NaN. Completion tokens were sampled under the constraint, so stay finite.
    return torch.where(torch.isfinite(picked), logp, torch.zeros_like(logp))




def sft_loss(model, batch: TokenBatch) -> torch.Tensor:
    """Mean next-token cross-entropy over completion tokens."""
    logp = token_logprobs(model, batch)
    mask = batch.completion_mask
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    import random

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    import random

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def apply_lora(model, lora_cfg):
    """Wrap the decoder's linear layers with PEFT LoRA; the audio encoder stays frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        # a regex: adapters on the decoder only, never the audio tower's projections
                        target_modules=r".*language_model.*\.(" + "|".join(lora_cfg.target_modules) + ")$")
    return get_peft_model(model, config)


def unwrap(model):
    """The plain transformers model under PEFT / DeepSpeed wrappers (merged view for LoRA)."""
    model = getattr(model, "module", model)
    return model


def exportable_model(model):
    """A model whose state dict is full backbone weights: LoRA merged into a copy."""
    model = unwrap(model)
    if hasattr(model, "merge_and_unload"):
        import copy

        return copy.deepcopy(model).merge_and_unload()
    return model






def maybe_set_threads(n: int) -> Optional[int]:
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def save_policy(model, processor, optimizer: Optimizer, path: Path, lora: bool) -> None:
    """A resumable policy checkpoint: merged backbone (loads in transformers and vLLM), the LoRA
    adapter when there is one (resume continues training it, not the merged copy), optimizer state."""
    from speechrl.rlhf.backbone import save_backbone

    path.mkdir(parents=True, exist_ok=True)
    save_backbone(exportable_model(model), processor, path / "model")
    if lora:
        unwrap(model).save_pretrained(path / "adapter")
    optimizer.save(path)


def load_policy(model, optimizer: Optimizer, path: Path, lora: bool) -> None:
    """Restore what `save_policy` wrote into a model built from the same base (full weights load with it)."""
    if lora:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(unwrap(model), load_file(str(path / "adapter" / "adapter_model.safetensors")))
    optimizer.load(path)


@dataclass
class TrainablePolicy:
    backbone: object  # rlhf.backbone.Backbone: processor, tokenizer, the plain model
    model: torch.nn.Module  # what trains: the backbone's model under PEFT / DeepSpeed wrappers
    optimizer: Optimizer
    reference: Optional[torch.nn.Module]  # frozen starting policy, for KL; None when not asked for


def build_policy(cfg, base_path: Path, checkpoint: Optional[Path] = None, with_reference: bool = False
                 ) -> TrainablePolicy:
    """The trainable policy of SFT and RL alike: backbone (from `checkpoint` when resuming),
    gradient checkpointing, LoRA, optimizer, and the checkpoint's adapter/optimizer state."""
    from speechrl.rlhf.backbone import load_backbone

    lora = cfg.model.lora.enabled
    # LoRA resumes from the base plus the saved adapter; full fine-tuning from the saved weights
    backbone = load_backbone(checkpoint / "model" if checkpoint and not lora else base_path)
    reference = None
    if with_reference:
        # the run's starting weights, also when resuming: a reference that moved with the
        # checkpoints would anchor KL to the wrong policy
        start = backbone.model if backbone.path == Path(base_path) else load_backbone(base_path).model
        reference = (copy.deepcopy(start) if start is backbone.model else start).eval().requires_grad_(False)
    model = backbone.model
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if lora:
        model = apply_lora(model, cfg.model.lora)
    model.train()
    optimizer = Optimizer(model, cfg.train, cfg.train.steps)
    if checkpoint:
        load_policy(optimizer.model, optimizer, checkpoint, lora)
    return TrainablePolicy(backbone, optimizer.model, optimizer, reference)
