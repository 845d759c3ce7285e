"""Fingerprints of what a build wrote, printed so that two machines can compare their assets."""
from __future__ import annotations

import hashlib
from pathlib import Path


def fingerprint(*items: str | bytes | Path) -> str:
    """12 hex digits of SHA-256 over `items` in order: a Path contributes its bytes, a str or
    bytes itself. Two machines that built the same asset print the same fingerprint."""
    h = hashlib.sha256()
    for item in items:
        data = Path(item).read_bytes() if isinstance(item, Path) else item
        data = data.encode("utf-8") if isinstance(data, str) else data
        h.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: ("ab", "c") != ("a", "bc")
    return h.hexdigest()[:12]
