"""Token batches and per-token logprobs: what SFT's loss and RL's update are computed from.

Token in, token out: a batch is built from prompt ids (the audio placeholder already
expanded, exactly as vLLM saw them) and completion ids, never re-tokenized from text.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from speechrl.rlhf.model.layout import LayoutMask, ReplyLayout
from speechrl.rlhf.model.tower_cache import cacheable, tower_cache


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [B, L] prompt + completion, right-padded
    attention_mask: torch.Tensor  # [B, L]
    input_features: Optional[torch.Tensor]  # [B, mel, frames] log-mel of each example's audio; None: text-only prompts
    feature_attention_mask: Optional[torch.Tensor]  # [B, frames]
    completion_mask: torch.Tensor  # [B, L-1] True where the next token is a completion token
    # Row i's prompt is shared with the other rows of group audio_index[i]: GRPO's n samples of a
    # prompt share one clip (ASR) or one text prompt (TTS), so each is stored (and run) once; with
    # audio, input_features[audio_index[i]] is row i's clip. None: every row has its own prompt.
    audio_index: Optional[torch.Tensor] = None

    def to(self, device: torch.device) -> "TokenBatch":
        """The same batch on `device` (the model's: core/devices.py)."""
        return TokenBatch(*(None if t is None else t.to(device) for t in (
            self.input_ids, self.attention_mask, self.input_features, self.feature_attention_mask,
            self.completion_mask, self.audio_index)))


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
                      audios: list[Optional[np.ndarray]], pad_id: int) -> TokenBatch:
    """Right-padded prompt + completion rows. `audios[i]` is row i's clip, or None for text-only
    prompts (TTS; then every row must be None). Rows with the same clip object (ASR) or the same
    prompt ids (text-only) are grouped, so their prompt is encoded and run once (audio_index)."""
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
    text_only = [a is None for a in audios]
    if any(text_only):
        if not all(text_only):
            raise ValueError("a batch mixes rows with and without audio; build one batch per mode")
        prompts: dict[tuple, int] = {}
        index = [prompts.setdefault(tuple(p), len(prompts)) for p in prompt_ids]
        return TokenBatch(ids, attn, None, None, comp, torch.tensor(index) if len(prompts) < len(index) else None)
    unique: dict[int, int] = {}  # id(clip) -> position among the distinct clips
    index = [unique.setdefault(id(a), len(unique)) for a in audios]
    if len(unique) == len(audios):
        return TokenBatch(ids, attn, *audio_features(processor, audios), comp)
    distinct = list({id(a): a for a in audios}.values())
    feats, feat_mask = audio_features(processor, distinct)
    return TokenBatch(ids, attn, feats, feat_mask, comp, torch.tensor(index))


# The decoding constraint as the trainer applies it: a [V] bool mask (ASR, TTS: a static list of
# allowed ids), a LayoutMask (realtime: the allowed ids change within the completion), or None.
Allowed = Optional[Union[torch.Tensor, LayoutMask]]


def vocab_mask(allowed_ids: Union[list[int], ReplyLayout], vocab_size: int) -> Union[torch.Tensor, LayoutMask]:
    """The trainer's form of a decoding constraint: a [V] mask of a list of ids, or a LayoutMask."""
    if isinstance(allowed_ids, ReplyLayout):
        return LayoutMask(allowed_ids, vocab_size)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[torch.tensor(allowed_ids)] = True
    return mask


def token_logprobs(model, batch: TokenBatch, temperature: float = 1.0, allowed: Allowed = None,
                   with_hidden: bool = False, feed: Optional[list[torch.Tensor]] = None):
    """log p(token_{t+1} | <= t) for every position, [B, L-1]; read it where completion_mask is True.

    Logits are divided by the temperature so this is the distribution vLLM sampled from. Rows sharing a
    clip (`batch.audio_index`, GRPO's n samples) run their prompt once; prompt positions are 0.
    `with_hidden` also returns last hidden states [B, L-1, H] on the same grid, for a value head.
    `feed`: the decoder's input for each of its passes, in order, instead of token and audio embeddings:
    for a model holding only the layers above a frozen bottom (`reference_above`), what
    `record_inputs` took of the policy's passes over the same batch.
    """
    if batch.audio_index is not None:
        logp, hidden = _shared_prompt_logprobs(model, batch, temperature, allowed, with_hidden, feed)
        return (logp, hidden) if with_hidden else logp
    allowed_head = AllowedHead.of(model, allowed)
    if feed is not None:
        kwargs = dict(inputs_embeds=_one_pass(feed))
    elif batch.input_features is None:
        kwargs = dict(input_ids=batch.input_ids)
    else:  # every row in full;
        # encode_audio, not the model's own forward: a frozen tower's outputs are cached (tower_cache.py)
        index = torch.arange(len(batch.input_ids), device=batch.input_ids.device)
        kwargs = dict(inputs_embeds=_inputs_embeds(model, batch.input_ids, batch.input_features,
                                                   batch.feature_attention_mask, index))
    targets, valid = batch.input_ids[:, 1:], batch.completion_mask
    if allowed_head is not None:  # the decoder's hidden states; the allowed ids' logits at completion positions
        hidden = audio_model(model)(attention_mask=batch.attention_mask, **kwargs).last_hidden_state[:, :-1]
        r, t = valid.nonzero(as_tuple=True)
        logp = _on_grid(valid.shape, (r, t), allowed_head.logprobs(hidden[r, t], targets[r, t], temperature))
        return (logp, hidden) if with_hidden else logp
    out = model(attention_mask=batch.attention_mask, output_hidden_states=with_hidden, **kwargs)
    logp = _logprobs(out.logits[:, :-1], targets, temperature, allowed, valid)
    return (logp, out.hidden_states[-1][:, :-1]) if with_hidden else logp


class AllowedHead:
    """The LM head's rows for a static decoding constraint: logits over the allowed ids alone.

    With the constraint, the full-vocabulary log-softmax is -inf outside the allowed ids, so the
    logsumexp over the allowed logits is the same number, at |allowed| / V of the head's work, forward
    and backward (ASR: 395 of 1425 ids) and no [positions, V] logits tensor; only completion positions
    are computed. Used on one plain (or PEFT) model; a DeepSpeed- or FSDP-wrapped model computes its
    head inside its own forward (its hooks gather the weights), and a per-position constraint (realtime's
    LayoutMask) needs every logit: both keep the full path (`of` returns None).
    """

    def __init__(self, lm_head: torch.nn.Linear, allowed: torch.Tensor):
        self.lm_head = lm_head
        self.ids = allowed.nonzero().squeeze(-1).to(lm_head.weight.device)
        self.position = torch.full((len(allowed),), -1, dtype=torch.long, device=self.ids.device)
        self.position[self.ids] = torch.arange(len(self.ids), device=self.ids.device)

    @classmethod
    def of(cls, model, allowed: Allowed) -> Optional["AllowedHead"]:
        if not isinstance(allowed, torch.Tensor) or getattr(model, "module", None) is not None:
            return None  # no static constraint, or a DeepSpeed engine
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = getattr(base, "lm_head", None)
        if type(head) is not torch.nn.Linear or type(head.weight) is not torch.nn.Parameter or _sharded(model):
            return None  # an adapted head, or sharded layers whose hooks gather weights in their forward
        return cls(head, allowed)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, |allowed|] fp32 logits of the rows of `hidden` [N, H], columns in `ids` order."""
        weight = self.lm_head.weight.index_select(0, self.ids)
        bias = None if self.lm_head.bias is None else self.lm_head.bias.index_select(0, self.ids)
        return torch.nn.functional.linear(hidden, weight, bias).float()

    def argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N]: the allowed id with the highest logit for each row of `hidden` (greedy decoding's choice)."""
        return self.ids[self.logits(hidden).argmax(-1)]

    def logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        """log p(target) for each row of `hidden` [N, H]; 0 where the target is not allowed (a prompt
        token: its position is never read, as in `_logprobs`)."""
        logits = self.logits(hidden)
        if temperature != 1.0:
            logits = logits / temperature
        column = self.position[targets]
        picked = logits.gather(-1, column.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        logp = picked - torch.logsumexp(logits, dim=-1)
        return torch.where(column >= 0, logp, torch.zeros_like(logp))


def _on_grid(shape: tuple, where: tuple, values: torch.Tensor) -> torch.Tensor:
    """`values` [N, ...] placed at the `where` (row, position) indices of a zero [*shape, ...] tensor."""
    return values.new_zeros(*shape, *values.shape[1:]).index_put(where, values)


def _logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, allowed: Allowed,
              valid: torch.Tensor) -> torch.Tensor:
    """`valid` [B, T] marks completion positions: a LayoutMask's phases are counted over them."""
    logits = logits.float()
    if isinstance(allowed, LayoutMask):  # per position, as rollouts/layout.py's processor masked it in vLLM
        logits = logits.masked_fill(~allowed.for_targets(targets, valid).to(logits.device), float("-inf"))
    elif allowed is not None:  # the decoding constraint, applied as vLLM applies allowed_token_ids
        logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    if temperature != 1.0:
        logits = logits / temperature
    # gather-then-logsumexp: avoids materializing a full [B, L, V] log_softmax copy
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logp = picked - torch.logsumexp(logits, dim=-1)
    # prompt positions hold tokens outside the constraint (e.g. <|AUDIO|>): -inf there would turn
    # masked sums into NaN. Completion tokens were sampled under the constraint, so stay finite.
    return torch.where(torch.isfinite(picked), logp, torch.zeros_like(logp))


def _cache_carries_gradients(model) -> bool:
    """Whether the shared prompt can run once with its KV cache reused by the completions. The cache
    carries gradients back into the decoder layers after the completions went through them: gradient
    checkpointing keeps no cache, and a sharded layer (model/sharding.py) frees its gathered weights
    once the completions' backward is through it, before the prompt's reaches it. Otherwise the
    prompt and its completions run packed in one sequence (model/packing.py)."""
    return not getattr(audio_model(model).language_model, "gradient_checkpointing", False) and not _sharded(model)


def _sharded(model) -> bool:
    """Whether the decoder's layers are FSDP-sharded (model/sharding.py)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(layer, FSDPModule) for layer in audio_model(model).language_model.layers)


def _shared_prompt_logprobs(model, batch: TokenBatch, temperature: float, allowed: Allowed,
                            with_hidden: bool = False, feed: Optional[list[torch.Tensor]] = None
                            ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """token_logprobs for rows grouped by clip: each distinct prompt (audio encoder and decoder)
    runs once, and only the completions run per row: through the prompt's KV cache, repeated for the
    group's rows, or packed after the prompt in one sequence (`_cache_carries_gradients`).

    On a GRPO batch (n samples of ~100 audio tokens + ~10 completion tokens each) this is about n
    times less decoder work than running every row in full; gradients flow through the shared prompt.
    """
    ids, comp, index = batch.input_ids, batch.completion_mask, batch.audio_index
    rows, width = ids.shape
    device = ids.device
    prompt_len = comp.int().argmax(-1) + 1  # the first completion token sits right after the prompt
    comp_len = comp.sum(-1)
    if bool((comp_len == 0).any()):
        raise ValueError("a row has no completion tokens; drop empty completions before the update")
    groups = int(index.max()) + 1
    first_row = torch.stack([(index == g).nonzero()[0, 0] for g in range(groups)])
    longest = int(prompt_len[first_row].max())
    prompt_mask = torch.arange(longest, device=device)[None, :] < prompt_len[first_row][:, None]
    leader = first_row[index]  # each row's group representative
    differs = (prompt_len != prompt_len[leader]) | ((ids[:, :longest] != ids[leader, :longest]) & prompt_mask[index]).any(-1)
    if bool(differs.any()):
        r = int(differs.nonzero()[0, 0])
        raise ValueError(f"row {r} shares clip {int(index[r])} with row {int(leader[r])} but not its prompt ids")
    steps = int(comp_len.max())
    positions = prompt_len[:, None] + torch.arange(steps, device=device)[None, :]  # completion tokens in `ids`
    valid = torch.arange(steps, device=device)[None, :] < comp_len[:, None]
    comp_ids = ids.gather(1, positions.clamp(max=width - 1))
    predict = _cache_predictions if _cache_carries_gradients(model) else _packed_predictions
    allowed_head = AllowedHead.of(model, allowed)
    logits, hidden = predict(model, batch, prompt_len, comp_len, first_row, prompt_mask, comp_ids, valid,
                             with_hidden or allowed_head is not None, allowed_head is None, feed)
    r, t = valid.nonzero(as_tuple=True)
    if allowed_head is None:
        logp = _logprobs(logits, comp_ids, temperature, allowed, valid)
    else:  # the allowed ids' logits at the completion positions alone
        logp = _on_grid(valid.shape, (r, t), allowed_head.logprobs(hidden[r, t], comp_ids[r, t], temperature))
    where = (r, positions[r, t] - 1)  # back onto the [rows, width - 1] grid of the plain path
    grid = _on_grid((rows, width - 1), where, logp[r, t])
    return grid, _on_grid((rows, width - 1), where, hidden[r, t]) if with_hidden else None


def _cache_predictions(model, batch, prompt_len, comp_len, first_row, prompt_mask, comp_ids, valid, with_hidden,
                       with_logits=True, feed=None):
    """Each row's outputs predicting its completion tokens [B, S, ...] (logits or None, last hidden
    states or None): the prompts run once, their KV cache repeated for their rows, then the completions.
    Without logits the decoder runs without its LM head (AllowedHead computes what is needed).
    `feed` (token_logprobs): the two passes' inputs, prompts then completions."""
    index = batch.audio_index
    if feed is not None and len(feed) != 2:
        raise ValueError(f"feed: {len(feed)} recorded passes, the prompt-then-completions path runs 2")
    embeds = feed[0] if feed is not None else _inputs_embeds(
        model, batch.input_ids[first_row, :prompt_mask.shape[1]], batch.input_features,
        batch.feature_attention_mask, torch.arange(len(first_row), device=index.device))
    run = model if with_logits else audio_model(model)
    prompt_out = run(inputs_embeds=embeds, attention_mask=prompt_mask.long(), use_cache=True,
                     output_hidden_states=with_hidden and with_logits)
    cache = prompt_out.past_key_values
    cache.reorder_cache(index)  # one copy of its prompt's keys/values per row (differentiable)
    positions = prompt_len[:, None] + torch.arange(comp_ids.shape[1], device=index.device)[None, :]
    attention = torch.cat([prompt_mask[index], valid], dim=1).long()
    comp_in = dict(input_ids=comp_ids) if feed is None else dict(inputs_embeds=feed[1])
    comp_out = run(**comp_in, attention_mask=attention, position_ids=positions, past_key_values=cache,
                   output_hidden_states=with_hidden and with_logits)

    def predicting(prompt_part: torch.Tensor, comp_part: torch.Tensor) -> torch.Tensor:
        # completion token t is predicted by the previous position: the prompt's last one for t = 0
        return torch.cat([prompt_part[index, prompt_len - 1][:, None], comp_part[:, :-1]], dim=1)

    if not with_logits:
        return None, predicting(prompt_out.last_hidden_state, comp_out.last_hidden_state)
    hidden = predicting(prompt_out.hidden_states[-1], comp_out.hidden_states[-1]) if with_hidden else None
    return predicting(prompt_out.logits, comp_out.logits), hidden


def _packed_predictions(model, batch, prompt_len, comp_len, first_row, prompt_mask, comp_ids, valid, with_hidden,
                        with_logits=True, feed=None):
    """As `_cache_predictions`, from one forward pass over each group packed in one sequence."""
    from speechrl.rlhf.model.packing import attention_mask_4d, pack_groups

    index = batch.audio_index
    packed = pack_groups(batch.input_ids, index, prompt_len, comp_len, first_row)
    embeds = _one_pass(feed) if feed is not None else _inputs_embeds(
        model, packed.input_ids, batch.input_features, batch.feature_attention_mask,
        torch.arange(len(first_row), device=index.device))
    attention = audio_model(model).language_model.config._attn_implementation
    mask = attention_mask_4d(packed.allowed, attention, embeds.dtype)
    run = model if with_logits else audio_model(model)
    out = run(inputs_embeds=embeds, attention_mask=mask, position_ids=packed.position_ids, use_cache=False,
              output_hidden_states=with_hidden and with_logits)
    rows = index[:, None]
    if not with_logits:
        return None, out.last_hidden_state[rows, packed.predictor]
    hidden = out.hidden_states[-1][rows, packed.predictor] if with_hidden else None
    return out.logits[rows, packed.predictor], hidden


def _one_pass(feed: list[torch.Tensor]) -> torch.Tensor:
    if len(feed) != 1:
        raise ValueError(f"feed: {len(feed)} recorded passes, this path runs 1")
    return feed[0]


@contextlib.contextmanager
def record_inputs(model, layer: int):
    """Within it, the hidden states entering decoder layer `layer` on each pass of `model`'s decoder,
    in order (a list, detached): what `token_logprobs(..., feed=)` gives a model of the layers above."""
    taken: list[torch.Tensor] = []

    def take(_module, args, kwargs):
        taken.append((args[0] if args else kwargs["hidden_states"]).detach())

    handle = audio_model(model).language_model.layers[layer].register_forward_pre_hook(take, with_kwargs=True)
    try:
        yield taken
    finally:
        handle.remove()


def audio_model(model):
    """The Qwen2AudioModel (audio tower, projector, decoder) under PEFT / DeepSpeed wrappers."""
    model = unwrap(model)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return model.model


def encode_audio(model, features: torch.Tensor, feature_mask: torch.Tensor) -> list[torch.Tensor]:
    """Audio tower + projector: one [audio tokens, hidden] tensor per clip.

    Written out because transformers' Qwen2-Audio forward encodes each row's clip itself, and a
    GRPO batch repeats every clip n times; this encodes each distinct clip once. The steps mirror
    Qwen2AudioModel.forward (transformers 5.x); test_policy checks the two agree.
    """
    from transformers.masking_utils import create_bidirectional_mask

    inner = audio_model(model)
    tower = inner.audio_tower
    feat_lengths, out_lengths = tower._get_feat_extract_output_lengths(feature_mask.sum(-1))
    frames = (features.shape[-1] - 2) // 2 + 1

    def run(rows: list[int]) -> torch.Tensor:  # the tower's output of clips `rows`, [len(rows), frames, hidden]
        valid = torch.arange(frames, device=features.device)[None, :] < feat_lengths[rows][:, None]
        mask = create_bidirectional_mask(config=tower.config,
                                         inputs_embeds=torch.zeros(len(rows), frames, 1, device=features.device),
                                         attention_mask=valid.long())
        return tower(features[rows], attention_mask=mask).last_hidden_state

    if cacheable(tower):  # frozen: each clip's tower output is computed once per process (tower_cache.py)
        with torch.no_grad():
            hidden = tower_cache(tower).outputs(tower, features, out_lengths, run)
        return [inner.multi_modal_projector(h) for h in hidden]
    trainable = any(p.requires_grad for p in tower.parameters())
    with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
        hidden = run(list(range(len(features))))
    projected = inner.multi_modal_projector(hidden)
    return [projected[i, : int(out_lengths[i])] for i in range(len(projected))]


def _inputs_embeds(model, input_ids: torch.Tensor, features: torch.Tensor, feature_mask: torch.Tensor,
                   audio_index: torch.Tensor) -> torch.Tensor:
    """Token embeddings with row i's placeholders filled by clip audio_index[i], each clip encoded once
    (no features: text-only prompts, plain token embeddings)."""
    inner = audio_model(model)
    embeds = inner.get_input_embeddings()(input_ids)
    if features is None:
        return embeds
    clips = encode_audio(model, features, feature_mask)
    audio = torch.cat([clips[int(i)] for i in audio_index]).to(embeds.dtype)
    slots = (input_ids == inner.config.audio_token_id).unsqueeze(-1)
    if int(slots.sum()) != len(audio):
        raise ValueError(f"{int(slots.sum())} audio placeholder tokens in the batch but {len(audio)} audio "
                         "frames encoded: prompt ids must come from the same processor and clip")
    return embeds.masked_scatter(slots, audio)


def sft_loss(model, batch: TokenBatch) -> torch.Tensor:
    """Mean next-token cross-entropy over completion tokens."""
    return completion_nll(token_logprobs(model, batch), batch.completion_mask)


def completion_nll(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean negative logprob over the completion positions of `mask`."""
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


def unwrap(model):
    """The plain transformers model under PEFT / DeepSpeed wrappers (merged view for LoRA)."""
    model = getattr(model, "module", model)
    return model
