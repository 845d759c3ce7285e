"""The policy side shared by SFT and RL: building the trainable model (LoRA, freezing, reference),
saving and restoring it, seeds and threads. Batches and logprobs live in logprobs.py."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from speechrl.rlhf.core.config import RecipeError
from speechrl.rlhf.core.devices import autocast, compute_dtype, train_device
from speechrl.rlhf.model.logprobs import audio_model, unwrap
from speechrl.rlhf.model.optim import Optimizer
from speechrl.rlhf.model.sharding import shard_backbone, sharded


def freeze_audio_encoder(model) -> None:
    audio_model(model).audio_tower.requires_grad_(False)


def freeze_language_model(model) -> None:
    """The decoder keeps its weights: embeddings, layers and the LM head (untied in a real backbone)."""
    audio_model(model).language_model.requires_grad_(False)
    model.get_output_embeddings().requires_grad_(False)


def freeze_decoder_layers(model, n: int) -> None:
    """Everything below decoder layer `n` keeps its weights: the audio tower, the projector, the token
    embeddings and layers 0..n-1 (their LoRA adapters too). No gradient then reaches layer n's input,
    so autograd runs no backward below it and keeps none of its activations: the update's backward
    covers the top layers only. n = the decoder's depth leaves its final norm and LM head trained."""
    depth = len(audio_model(model).language_model.layers)
    if n > depth:
        raise RecipeError(f"`model.freeze_decoder_layers`={n}, but the decoder has {depth} layers; "
                          f"set it to at most {depth}")
    for module in _below(model, n):
        module.requires_grad_(False)


def _below(model, n: int) -> list[torch.nn.Module]:
    """What sits below decoder layer `n`: the audio tower, the projector, the token embeddings and
    layers 0..n-1 (what `freeze_decoder_layers` freezes and `reference_above` shares)."""
    inner = audio_model(model)
    return [inner.audio_tower, inner.multi_modal_projector, inner.get_input_embeddings(),
            *inner.language_model.layers[:n]]


def reference_above(reference, n: int):
    """The reference from decoder layer `n` up (layers n.., final norm, LM head), for a policy whose
    weights below layer n are frozen (`freeze_decoder_layers`): below it the two compute the same
    hidden states, so the reference takes the policy's (`record_inputs`, `token_logprobs(feed=)`) and
    its forward runs only the layers above. Those layers are copied (renumbered from 0, as the decoder's
    KV cache and masks count layers from its first); the rest is shared with `reference`, not copied.
    transformers has no entry point halfway up a decoder, hence this."""
    top = copy.deepcopy(reference, memo={id(m): m for m in _below(reference, n)})
    top_lm = audio_model(top).language_model
    top_lm.layers = torch.nn.ModuleList(top_lm.layers[n:])
    top_lm.config.num_hidden_layers = len(top_lm.layers)
    top_lm.config.layer_types = top_lm.config.layer_types[n:]
    for i, layer in enumerate(top_lm.layers):
        layer.self_attn.layer_idx = i
    return top


def apply_lora(model, lora_cfg):
    """Wrap the decoder's linear layers with PEFT LoRA; the audio encoder stays frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        # a regex: adapters on the decoder only, never the audio tower's projections
                        target_modules=r".*language_model.*\.(" + "|".join(lora_cfg.target_modules) + ")$")
    return get_peft_model(model, config)


def exportable_model(model):
    """A model whose state dict is full backbone weights: LoRA merged into a copy."""
    model = unwrap(model)
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model


def save_policy(model, processor, optimizer: Optimizer, path: Path, lora: bool, mtp=None) -> None:
    """A resumable policy checkpoint: merged backbone (loads in transformers and vLLM) with its MTP
    heads when there are some (model/mtp/), the LoRA
    adapter when there is one (resume continues training it, not the merged copy), optimizer state.
    Sharded (several ranks): `model` is `unsharded_copy`'s, None on ranks > 0, which still join the
    optimizer's gather; rank 0 writes. The files are the same whatever the number of ranks."""
    if model is not None:
        path.mkdir(parents=True, exist_ok=True)
        save_model(model, processor, path / "model", mtp)
        if lora:
            unwrap(model).save_pretrained(path / "adapter")
    optimizer.save(path)


def save_model(model, processor, path: Path, mtp=None) -> Path:
    """The policy's full weights as a backbone directory (LoRA merged), its MTP heads in `mtp/`: what
    a checkpoint's model/ and a run's final/ hold, and what the engines and `run.init_from` load."""
    from speechrl.rlhf.model.backbone import save_backbone

    save_backbone(exportable_model(model), processor, path)
    if mtp is not None:
        mtp.save(path)
    return path


def load_adapter(model, path: Path) -> None:
    """A checkpoint's LoRA adapter into a PEFT model built from the same base (before any sharding)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(unwrap(model), load_file(str(path / "adapter" / "adapter_model.safetensors")))


def unsharded_copy(model, base_path: Path, lora_cfg):
    """A sharded policy's full weights in a plain model of its own, on rank 0 (None elsewhere): what
    evaluation, export and the engines read. A collective: every rank calls it."""
    from speechrl.rlhf.model.backbone import load_backbone
    from speechrl.rlhf.model.sharding import full_state_dict

    state = full_state_dict(model)
    if not state:
        return None
    copy_ = load_backbone(base_path).model
    if lora_cfg.enabled:
        copy_ = apply_lora(copy_, lora_cfg)
    copy_.load_state_dict(state)
    return copy_.eval()


@dataclass
class TrainablePolicy:
    backbone: object  # rlhf.backbone.Backbone: processor, tokenizer, the plain model
    model: torch.nn.Module  # what trains: the backbone's model under PEFT / DeepSpeed wrappers
    optimizer: Optimizer
    reference: Optional[torch.nn.Module]  # frozen starting policy, for KL; None when not asked for
    device: torch.device = torch.device("cpu")  # where model and reference sit (core/devices.py)
    dtype: torch.dtype = torch.float32  # the forward passes' precision; the weights stay fp32
    mtp: Optional[torch.nn.Module] = None  # model/mtp.py's draft heads (model.mtp.num_heads > 0), saved with the policy
    # the reference above the frozen bottom (model.freeze_decoder_layers; `reference_above`), fed the
    # policy's hidden states at `frozen_layers`; None where it cannot be (`_fed_reference`)
    reference_top: Optional[torch.nn.Module] = None

    def autocast(self):
        """The context every forward pass of this policy (and its reference) runs in."""
        return autocast(self.device, self.dtype)

    @property
    def frozen_layers(self) -> int:
        """The decoder layer `reference_top` starts at (0 without one)."""
        if self.reference_top is None:
            return 0
        return len(audio_model(self.reference).language_model.layers) - \
            len(audio_model(self.reference_top).language_model.layers)


def build_policy(cfg, base_path: Path, checkpoint: Optional[Path] = None, with_reference: bool = False, *,
                 updates_per_step: int = 1, extra_params: Sequence[torch.nn.Parameter] = (),
                 train_mtp: bool = True) -> TrainablePolicy:
    """The trainable policy of SFT and RL alike: backbone (from `checkpoint` when resuming),
    gradient checkpointing, LoRA, optimizer, and the checkpoint's adapter/optimizer state.
    `updates_per_step` and `extra_params` go to the Optimizer (RL's epochs x minibatches, a value head;
    on the policy's device already). Model and reference move to `train.device` before the optimizer
    sees their parameters. With model.mtp.num_heads, the MTP heads saved with the weights (or new ones)
    come too, trained by the same optimizer where `train_mtp`, clipped on their own (side params)."""
    from speechrl.rlhf.model.backbone import load_backbone
    from speechrl.rlhf.model.mtp import heads_for

    lora = cfg.model.lora.enabled
    device = train_device(cfg.train.device)
    # LoRA resumes from the base plus the saved adapter; full fine-tuning from the saved weights
    backbone = load_backbone(checkpoint / "model" if checkpoint and not lora else base_path)
    reference = None
    if with_reference:
        # the run's starting weights, also when resuming: a reference that moved with the
        # checkpoints would anchor KL to the wrong policy
        start = backbone.model if backbone.path == Path(base_path) else load_backbone(base_path).model
        reference = (copy.deepcopy(start) if start is backbone.model else start).eval().requires_grad_(False)
        reference.to(device)
    model = backbone.model.to(device)
    # a LoRA run resumes from the base weights, but its heads are the checkpoint's
    mtp = heads_for(cfg, checkpoint / "model" if checkpoint else backbone.path, model.get_output_embeddings())
    if mtp is not None:
        mtp.requires_grad_(train_mtp)
    if cfg.model.freeze_audio_encoder:
        freeze_audio_encoder(model)
    if cfg.model.freeze_language_model:
        freeze_language_model(model)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if lora:
        model = apply_lora(model, cfg.model.lora)
        if checkpoint:
            load_adapter(model, checkpoint)
    if cfg.model.freeze_decoder_layers:  # after LoRA: the frozen layers' adapters stay frozen too
        freeze_decoder_layers(model, cfg.model.freeze_decoder_layers)
    model.train()
    if sharded():  # several trainer ranks (model/sharding.py); after the weights are final, before the optimizer
        shard_backbone(model)
        if reference is not None:
            shard_backbone(reference)
    optimizer = Optimizer(model, cfg.train, cfg.train.steps, updates_per_step=updates_per_step,
                          extra_params=extra_params,
                          side_params=list(mtp.parameters()) if mtp is not None and train_mtp else ())
    if checkpoint:
        optimizer.load(checkpoint)
    return TrainablePolicy(backbone, optimizer.model, optimizer, reference, device,
                           compute_dtype(cfg.train.dtype, device), mtp, _fed_reference(cfg, model, reference))


def _fed_reference(cfg, model, reference) -> Optional[torch.nn.Module]:
    """`reference_above` the frozen bottom where the policy's hidden states can feed it: its passes must be
    the reference's (the KV-cache path: no gradient checkpointing, no sharding) and its weights below the
    cut the reference's (not so after a resume that froze fewer layers, nor under LoRA, whose adapters
    sit beside the weights). None elsewhere: the reference then runs in full."""
    n = cfg.model.freeze_decoder_layers
    if reference is None or not 0 < n < len(audio_model(model).language_model.layers) or cfg.model.lora.enabled \
            or sharded() or cfg.model.gradient_checkpointing:
        return None
    same = all(torch.equal(p, q) for a, b in zip(_below(model, n), _below(reference, n))
               for p, q in zip(a.parameters(), b.parameters()))
    return reference_above(reference, n) if same else None
