"""Shared fixtures. Tests import the installed `speechrl` package, never the bare folders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _shared_data_dir() -> Path:
    # ../shared/data beside the checkout (this workplace and CI); overridable for other setups.
    return Path(os.environ.get("SPEECHRL_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real recordings made by other people (see SOURCES.md there); skip where absent."""
    path = _shared_data_dir()
    if not (path / "real_speech").is_dir():
        pytest.skip(f"real recordings not found at {path} (set SPEECHRL_SHARED_DATA to use them)")
    return path
