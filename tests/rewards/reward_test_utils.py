"""Reward servers for the tests: in-process (a thread) and as a real `speechrl serve-reward` process.

A module of its own rather than conftest.py: test modules import these, and several conftest.py
files in the suite would shadow each other under the one module name "conftest".
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
# the installed console script: on PATH, or beside this interpreter when its venv is not activated
_BESIDE = Path(sys.executable).with_name("speechrl")
SPEECHRL = shutil.which("speechrl") or (str(_BESIDE) if _BESIDE.is_file() else None)


@contextmanager
def serving(server):
    """A RewardServer listening on 127.0.0.1 (a free port) from an event loop in a thread; yields its URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner, url = asyncio.run_coroutine_threadsafe(server.start("127.0.0.1", 0), loop).result(30)
    try:
        yield url
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        server.pool.shutdown(wait=False, cancel_futures=True)


@contextmanager
def reward_server_process(*args: str, env: dict | None = None):
    """`speechrl serve-reward ARGS --port 0` as a real process; yields (process, URL)."""
    if SPEECHRL is None:
        pytest.skip("speechrl console script not installed (pip install -e .)")
    proc = subprocess.Popen([SPEECHRL, "serve-reward", *args, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    try:
        seen, match = [], None
        for line in proc.stdout:  # the server prints its URL once it listens (after any warnings)
            seen.append(line)
            if match := re.search(r"on (http://127\.0\.0\.1:\d+)", line):
                break
        assert match, f"serve-reward did not start: {''.join(seen)}"
        # keep reading its output, or a chatty server would block on a full pipe
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield proc, match.group(1)
    finally:
        proc.kill()
        proc.wait(10)
