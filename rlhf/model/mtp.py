"""Multi-token prediction (MTP) heads: drafts that verified decoding checks against the policy.

Head i reads the decoder's last hidden state at position t (the one whose LM head predicts token
t+1) and predicts token t+2+i. During decoding the engine samples token t+1 from the policy, the heads
draft t+2 .. t+k+1 at once, and the next forward pass of the policy verifies them all: it keeps the
drafted prefix that its own sampler accepts (exactly the policy's distribution: a draft d is kept with
probability p(d), else the token comes from p with d taken out), so one step emits 1 .. k+1 tokens.

The heads are stored in vLLM's Medusa layout (a residual SiLU block and an LM head per head, a
`medusa` config) in `<backbone dir>/mtp/`, so vLLM's own speculative decoding (`method: medusa`)
drafts with them and its rejection sampler verifies: no proposer or sampler of ours. They train on the
decoder's hidden states *detached*: the heads learn to predict what the policy will say, and never
change what the policy says (its outputs, its loss and its WER are those of a run without heads).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from speechrl.rlhf.model.logprobs import AllowedHead

log = logging.getLogger(__name__)

MTP_DIR = "mtp"  # the heads' folder inside a backbone directory (a checkpoint's model/, a run's final/)
MTP_PREFIX = "mtp."  # the heads' tensors among the weights a sync sends to the engines (their own names after it)


class _Residual(nn.Module):
    """x + SiLU(W x), `num_layers` times: vLLM's Medusa ResidualBlock, parameter names included."""

    def __init__(self, hidden: int, num_layers: int = 1):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(hidden, hidden, bias=False) for _ in range(num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + nn.functional.silu(layer(x))
        return x


class _FrozenHead(nn.Module):
    """An LM head whose weight is a buffer: it moves, saves and loads as `weight` (vLLM's name), and no
    optimizer or `requires_grad_` anywhere can make it train."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.in_features, self.out_features = hidden, vocab
        self.register_buffer("weight", torch.empty(vocab, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)


class MtpHeads(nn.Module):
    """`num_heads` draft heads over a decoder of width `hidden` and vocabulary `vocab`, each a residual
    block of `num_layers` layers under an LM head of its own, or (`shared_lm_head`, Medusa-1) all of
    them under one frozen LM head, which only the blocks learn to read."""

    def __init__(self, num_heads: int, hidden: int, vocab: int, num_layers: int = 1, shared_lm_head: bool = False):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"MtpHeads: num_heads must be >= 1, got {num_heads}")
        if num_layers < 1:
            raise ValueError(f"MtpHeads: num_layers must be >= 1, got {num_layers}")
        self.shared_lm_head = shared_lm_head
        # the random init is always overwritten (`like`, `load`): leave the run's random stream alone
        with torch.random.fork_rng(devices=[]):
            self.blocks = nn.ModuleList([_Residual(hidden, num_layers) for _ in range(num_heads)])
            if shared_lm_head:  # one frozen module, saved once as `lm_head` (vLLM's name for it)
                self.lm_head = _FrozenHead(hidden, vocab)
                self.lm_heads = [self.lm_head] * num_heads
            else:
                self.lm_heads = nn.ModuleList([nn.Linear(hidden, vocab, bias=False) for _ in range(num_heads)])

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    @property
    def num_layers(self) -> int:
        return len(self.blocks[0].layers)

    @classmethod
    def like(cls, lm_head: nn.Linear, num_heads: int, num_layers: int = 1, shared_lm_head: bool = False) -> "MtpHeads":
        """New heads that start as the policy's own LM head (zero residual blocks): each first predicts
        token t+1 for t+2+i, a better start than random rows over a large vocabulary."""
        vocab, hidden = lm_head.weight.shape
        heads = cls(num_heads, hidden, vocab, num_layers, shared_lm_head)
        with torch.no_grad():
            for block, head in zip(heads.blocks, heads.lm_heads):
                for layer in block.layers:
                    layer.weight.zero_()
                head.weight.copy_(lm_head.weight)
        return heads.to(lm_head.weight.device)

    def loss(self, hidden: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor,
             positions: float = 1.0, generator: Optional[torch.Generator] = None,
             next_tokens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean cross-entropy of every head on the completion tokens, and each head's top-1 accuracy.

        `hidden` [B, L-1, H] and `completion_mask` [B, L-1] are on token_logprobs' grid: position t's
        hidden state predicts token t+1, so head i's target is input_ids[:, t+2+i], counted where that
        token is a completion token too. Detached: the heads never move the policy (module docstring).
        `positions` < 1 reads that share of the positions t, drawn at random from `generator` (the
        caller's own, so the draw never shifts the policy's random stream), the same draw for every
        head; a draw with none reads them all. `next_tokens` [B, L-1], on the same grid: the token each
        position's target is, in place of the batch's own next token (`input_ids[:, 1:]`): in RL, the
        policy's greedy choice there (`greedy_next_tokens`) rather than the token it sampled.
        """
        hidden = hidden.detach()
        following = input_ids[:, 1:] if next_tokens is None else next_tokens
        losses, metrics = [], {}
        width = completion_mask.shape[1]
        source = completion_mask  # the positions whose hidden states the heads read
        if positions < 1.0:
            draw = torch.rand(completion_mask.shape, generator=generator, device=completion_mask.device)
            drawn = completion_mask & (draw < positions)
            source = drawn if bool(drawn.any()) else completion_mask
        for i, (block, head) in enumerate(zip(self.blocks, self.lm_heads)):
            shift = i + 1  # head i at position t predicts the token the main head predicts at t + shift
            if shift >= width:
                break
            valid = source[:, :-shift] & completion_mask[:, shift:]
            if not bool(valid.any()):
                break  # completions shorter than this head's reach: it and the heads after it have no target
            targets = following[:, shift:][valid]
            # only the positions with a target: a GRPO batch's grid is mostly prompt (audio) positions
            head_logits = head(block(hidden[:, :-shift][valid])).float()
            losses.append(nn.functional.cross_entropy(head_logits, targets))
            metrics[f"mtp_acc_{i + 1}"] = float((head_logits.argmax(-1) == targets).float().mean())
        if not losses:
            return hidden.new_zeros(()), metrics
        loss = torch.stack(losses).mean()
        metrics["mtp_loss"] = float(loss.detach())
        return loss, metrics

    def save(self, backbone_dir: Path) -> Path:
        """Write the heads into `backbone_dir/mtp` in vLLM's Medusa layout; that folder."""
        from safetensors.torch import save_file

        out = Path(backbone_dir) / MTP_DIR
        out.mkdir(parents=True, exist_ok=True)
        hidden, vocab = self.lm_heads[0].in_features, self.lm_heads[0].out_features
        config = {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": hidden,
                  "vocab_size": vocab, "num_heads": self.num_heads, "num_hidden_layers": self.num_layers,
                  "original_lm_head": self.shared_lm_head}
        (out / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()},
                  str(out / "model.safetensors"))
        return out

    @classmethod
    def load(cls, backbone_dir: Path) -> "MtpHeads":
        from safetensors.torch import load_file

        folder = Path(backbone_dir) / MTP_DIR
        config = json.loads((folder / "config.json").read_text())
        heads = cls(config["num_heads"], config["hidden_size"], config["vocab_size"], config.get("num_hidden_layers", 1),
                    config.get("original_lm_head", False))
        heads.load_state_dict(load_file(str(folder / "model.safetensors")))
        return heads


@torch.no_grad()
def greedy_next_tokens(lm_head: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
                       completion_mask: torch.Tensor, allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, L-1]: at each completion position the token the policy would choose greedily there (its LM
    head's argmax over the `allowed` ids, a bool mask over the vocabulary), elsewhere the batch's own
    next token. Verified decoding keeps a draft where it equals that choice, so in RL, where the batch's
    tokens are samples, these are the targets that keep the heads' greedy acceptance up."""
    following = input_ids[:, 1:].clone()
    states = hidden.detach()[completion_mask]
    if allowed is not None and type(lm_head) is nn.Linear:  # the allowed rows alone: no [positions, V] logits
        following[completion_mask] = AllowedHead(lm_head, allowed.to(lm_head.weight.device)).argmax(states)
        return following
    logits = lm_head(states).float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    following[completion_mask] = logits.argmax(-1)
    return following


def has_heads(backbone_dir: Path) -> bool:
    return (Path(backbone_dir) / MTP_DIR / "config.json").is_file()


def saved_heads(backbone_dir: Path) -> int:
    """How many MTP heads `backbone_dir` holds (0 without any)."""
    if not has_heads(backbone_dir):
        return 0
    return int(json.loads((Path(backbone_dir) / MTP_DIR / "config.json").read_text())["num_heads"])


def heads_for(cfg, backbone_dir: Path, lm_head: nn.Linear) -> Optional[MtpHeads]:
    """The recipe's heads (`model.mtp.num_heads`; None for 0): the ones saved with the backbone, or
    new ones started from its LM head. Saved heads beyond num_heads are dropped; too few is an error."""
    from speechrl.rlhf.core.checks import mtp_trainable

    wanted = cfg.model.mtp.num_heads
    if not wanted:
        return None
    if not mtp_trainable(cfg):
        log.warning("MTP: model.mtp.num_heads=%d ignored: heads train on one plain rank only (not with "
                    "train.num_ranks > 1 or DeepSpeed yet); this run's checkpoints carry none", wanted)
        return None
    shared = cfg.model.mtp.shared_lm_head  # None: as the saved heads are (new ones: an LM head each)
    if not has_heads(backbone_dir):
        log.info("MTP: %s has no heads; %d new heads start from the LM head", backbone_dir, wanted)
        return MtpHeads.like(lm_head, wanted, cfg.model.mtp.num_layers, bool(shared))
    saved = MtpHeads.load(backbone_dir)
    if saved.num_layers != cfg.model.mtp.num_layers:
        raise ValueError(f"{Path(backbone_dir) / MTP_DIR}: heads of {saved.num_layers} layer(s) saved, "
                         f"model.mtp.num_layers={cfg.model.mtp.num_layers} asked; set it to {saved.num_layers}")
    if shared is not None and saved.shared_lm_head != shared:
        raise ValueError(f"{Path(backbone_dir) / MTP_DIR}: heads saved with{'' if saved.shared_lm_head else 'out'} one "
                         f"shared LM head, model.mtp.shared_lm_head={str(shared).lower()} asked; set it to "
                         f"{str(saved.shared_lm_head).lower()}")
    if saved.num_heads < wanted:
        raise ValueError(f"{Path(backbone_dir) / MTP_DIR}: {saved.num_heads} MTP heads saved, "
                         f"model.mtp.num_heads={wanted} asked; lower it or train the heads anew from a backbone without them")
    saved.blocks, saved.lm_heads = saved.blocks[:wanted], saved.lm_heads[:wanted]
    return saved.to(lm_head.weight.device)


def acceptance(drafts: int, accepted_per_position: list[int]) -> dict:
    """Verified decoding's acceptance from an engine's counters: `drafts` steps that drafted, and how
    many of them kept draft position j (a kept position implies every earlier one kept). The mean
    tokens a drafting step emits (the verified prefix plus the policy's own token), the share of steps
    that kept each position (`kept`) and the histogram of drafts kept per step (0 .. k)."""
    if drafts <= 0:
        return {"drafts": 0, "mean_emitted": float("nan"), "kept": [], "histogram": []}
    kept = [n / drafts for n in accepted_per_position]
    # steps that kept exactly j drafts: those that kept j minus those that kept j + 1
    histogram = [a - b for a, b in zip([1.0, *kept], [*kept, 0.0])]
    return {"drafts": drafts, "mean_emitted": 1 + sum(kept), "kept": kept, "histogram": histogram}


class AcceptanceMeter:
    """Acceptance over intervals, from engines' counters that only grow (RolloutEngine.spec_stats):
    each `update` reports the drafting steps since the previous one, summed over the engines."""

    def __init__(self):
        self.seen: Optional[tuple[int, list[int]]] = None

    def update(self, counters: list[dict], prefix: str) -> dict:
        """`<prefix>/mtp_emitted` (mean tokens a decoding step emitted) and `<prefix>/mtp_accepted_<j>`
        (share of steps that kept draft j) since the last call; {} when nothing drafted meanwhile, or
        when an engine was replaced (its counters started again)."""
        drafts = sum(c["drafts"] for c in counters)
        kept = [sum(column) for column in zip(*(c["accepted_per_position"] for c in counters))]
        last_drafts, last_kept = self.seen or (0, [0] * len(kept))
        self.seen = (drafts, kept)
        if drafts <= last_drafts:
            return {}
        stats = acceptance(drafts - last_drafts, [a - b for a, b in zip(kept, last_kept)])
        return {f"{prefix}/mtp_emitted": stats["mean_emitted"],
                **{f"{prefix}/mtp_accepted_{j + 1}": share for j, share in enumerate(stats["kept"])}}
