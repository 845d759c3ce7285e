"""The policy side shared by SFT and RL: token batches, per-token logprobs, the optimizer.

Token in, token out: a batch is built from prompt ids (the audio placeholder already
expanded, exactly as vLLM saw them) and completion ids, never re-tokenized from text.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [B, L] prompt + completion, right-padded
    attention_mask: torch.Tensor  # [B, L]
    input_features: torch.Tensor  # [B, mel, frames] log-mel of each example's audio
    feature_attention_mask: torch.Tensor  # [B, frames]
    completion_mask: torch.Tensor  # [B, L-1] True where the next token is a completion token

    def to(self, device) -> "TokenBatch":
        return TokenBatch(*(t.to(device) for t in vars(self).values()))


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


def completion_lists(logprobs: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    return [row[m].tolist() for row, m in zip(logprobs, mask)]


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to min_ratio (a pure function, so resume is exact)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Optimizer:
    """AdamW + schedule + clipping, or the same through DeepSpeed; one `step(loss)` for both.

    DeepSpeed on CPU runs one gloo process; on a cluster the launcher sets the env it reads.
    """

    def __init__(self, model: torch.nn.Module, train_cfg, total_steps: int):
        self.cfg = train_cfg
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, train_cfg.warmup_steps, total_steps, train_cfg.lr_min_ratio))
        self.engine = None
        self.model = model
        if train_cfg.deepspeed.enabled:
            self.engine = _deepspeed_engine(model, self.optimizer, self.scheduler, train_cfg)
            self.model = self.engine

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
        else:
            loss.backward()

    def step(self) -> dict:
        # the rate this update applies: read before the scheduler moves on to the next step's
        lr = self.scheduler.get_last_lr()[0]
        if self.engine is not None:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return {"grad_norm": float(norm) if norm is not None else float("nan"), "lr": lr}
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm), "lr": lr}

    def save(self, path: Path) -> None:
        if self.engine is not None:
            self.engine.save_checkpoint(str(path / "deepspeed"))
        else:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       path / "optimizer.pt")

    def load(self, path: Path) -> None:
        if self.engine is not None:
            self.engine.load_checkpoint(str(path / "deepspeed"), load_module_strict=False)
        else:
            state = torch.load(path / "optimizer.pt", weights_only=False)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])


def _deepspeed_engine(model, optimizer, scheduler, train_cfg):
    import deepspeed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
        os.environ.setdefault(key, value)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    config = {"train_micro_batch_size_per_gpu": train_cfg.batch_size, "gradient_accumulation_steps": 1,
              "gradient_clipping": train_cfg.max_grad_norm,
              "zero_optimization": {"stage": train_cfg.deepspeed.zero_stage}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


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


def device_of(model) -> torch.device:
    return next(unwrap(model).parameters()).device


def describe_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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
