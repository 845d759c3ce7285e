"""A cache of LLM-judge answers: an in-memory LRU in front of an optional SQLite file.

Keys are hashes of everything that decides an answer (the judge's fingerprint, the labels it is
asked for, the full prompt text, rubric included), so a changed rubric, persona or judge model is
a miss, never a stale hit. Several reward workers may share one file: SQLite locks it.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class JudgeCache:
    """get/put JSON-able values by key; `hits` and `misses` count lookups since construction."""

    def __init__(self, max_entries: int = 50_000, path: Optional[str | Path] = None):
        self.max_entries, self.hits, self.misses = max_entries, 0, 0
        self._memory: OrderedDict[str, Any] = OrderedDict()
        self._db = None
        if path is not None:
            path = Path(path).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            # timeout: another worker may hold the write lock for a moment
            self._db = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
            self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.commit()
        self.path = path

    def get(self, key: str) -> Optional[Any]:
        value = self._memory.get(key)
        if value is not None:
            self._memory.move_to_end(key)
        elif self._db is not None:
            row = self._db.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
            if row is not None:
                value = json.loads(row[0])
                self._remember(key, value)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put_many(self, items: dict[str, Any]) -> None:
        for key, value in items.items():
            self._remember(key, value)
        if self._db is not None and items:
            with self._db:  # one transaction per batch
                self._db.executemany("INSERT OR REPLACE INTO answers (key, value) VALUES (?, ?)",
                                     [(k, json.dumps(v)) for k, v in items.items()])

    def _remember(self, key: str, value: Any) -> None:
        if self.max_entries <= 0:
            return
        self._memory[key] = value
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_entries:
            self._memory.popitem(last=False)

    def __len__(self) -> int:
        return len(self._memory)
