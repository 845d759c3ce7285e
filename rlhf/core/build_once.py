"""Assets built once into a cache folder and shared: one lock per folder, so processes that need the
same asset at once (reward workers starting together, trainers of several runs) build it once."""
from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Callable


def build_once(path: Path, built: Callable[[Path], bool], build: Callable[[], None]) -> Path:
    """`path`, after `build()` ran under the lock of `path`'s folder unless `built(path)` was already
    true. `build` writes its output somewhere private and renames it to `path` when whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built(path):
            build()
    return path
