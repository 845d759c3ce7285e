"""Audio-tower outputs of a frozen encoder, kept per clip so each clip is encoded once per process.

With `model.freeze_audio_encoder: true` the tower is a fixed function of a clip's features, and a
Whisper tower runs its whole 30 s window for every clip: on the small real backbone that is about
half of an SFT step on a CPU. SFT revisits every clip once an epoch and GRPO draws its prompts from
the same pool, so the tower's output for a clip is computed once and reused (trimmed to the clip's
frames: ~115 kB for a 3 s clip on Whisper tiny). transformers has no such cache (its forward encodes
the clip every call); this one is ~60 lines, keyed by the features' bytes, so nothing upstream has to
carry clip ids.

Correctness: an entry is only served while the tower has no trainable parameter and computes
deterministically (no dropout or layerdrop in training mode); any in-place change of a tower weight
(a checkpoint loaded into it, a weight sync) bumps the tensors' version counters and empties the
cache. Bounded by `max_bytes` (least recently used entries go first).
"""
from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from typing import Callable

import torch

DEFAULT_MAX_BYTES = 2 * 2**30


class TowerCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self._weights_version: tuple = ()

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def outputs(self, tower: torch.nn.Module, features: torch.Tensor, out_lengths: torch.Tensor,
                run: Callable[[list[int]], torch.Tensor]) -> list[torch.Tensor]:
        """Each clip's tower output [out_lengths[i], hidden]: cached ones, the rest from `run(missing rows)`."""
        version = tuple(p._version for p in tower.parameters())
        if version != self._weights_version:
            self.clear()
            self._weights_version = version
        keys = [_key(row, int(n)) for row, n in zip(features, out_lengths)]
        missing = [i for i, k in enumerate(keys) if k not in self.entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = {}
        if missing:
            hidden = run(missing)
            for j, i in enumerate(missing):
                fresh[keys[i]] = hidden[j, : int(out_lengths[i])].detach().clone()
        out = []
        for k in keys:
            if k in fresh:
                out.append(fresh[k])
                self._store(k, fresh[k])
            else:
                self.entries.move_to_end(k)
                out.append(self.entries[k])
        return out

    def _store(self, key: bytes, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        self.entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


def _key(features: torch.Tensor, frames: int) -> bytes:
    # the whole row: Whisper's padding frames depend on the clip (the log-mel floor is its max - 8);
    # and its length: silent clips of different lengths have the same padded features (a duplex
    # dialogue's first chunks), but not the same number of output frames
    row = features.detach().to("cpu").contiguous()
    return hashlib.blake2b(row.numpy().tobytes() + str((tuple(row.shape), frames)).encode(), digest_size=16).digest()


_caches: "weakref.WeakKeyDictionary[torch.nn.Module, TowerCache]" = weakref.WeakKeyDictionary()


def cacheable(tower: torch.nn.Module) -> bool:
    """True when the tower's output is a fixed function of its input: frozen, and no randomness."""
    if any(p.requires_grad for p in tower.parameters()):
        return False
    if not tower.training:
        return True
    cfg = tower.config
    return not any(getattr(cfg, k, 0) or 0 for k in ("dropout", "attention_dropout", "activation_dropout", "layerdrop"))


def tower_cache(tower: torch.nn.Module) -> TowerCache:
    """The cache of this tower object (one per model in the process)."""
    if tower not in _caches:
        _caches[tower] = TowerCache()
    return _caches[tower]
