"""Name -> object registries for pluggable parts (advantage estimators, losses, rewards, transports).

One class serves them all: registering a name twice is an error (a silently replaced loss
is a silent change of algorithm), and an unknown name lists the registered ones.
"""
from __future__ import annotations

import re
from typing import Callable, Generic, TypeVar

T = TypeVar("T")

REWARD_NAME = re.compile(r"[A-Za-z0-9_-]+")  # names a reward registers under: no "." or ":", which would read as dotted paths


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._items[name]!r})")
            self._items[name] = obj
            return obj
        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._items)) or 'none'}")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)


MODES: Registry = Registry("mode")  # filled by speechrl.rlhf.modes (one class per operational mode)
