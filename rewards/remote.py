"""The `remote` reward: score on a reward server (`speechrl serve-reward`, or any that speaks wire.py).

A slow or dead server must neither hang nor kill a run: timeouts, retries with backoff, then
`Unscored(why)`, so a batch waits at most about ceil(chunks / max_concurrency) * (retries + 1) *
timeout_s plus backoff. A misconfiguration (wrong token, body too large, broken server reward) raises
with what to change: retrying cannot fix it, and hours of unscored steps are worse.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import Any, Awaitable, Callable, Optional

import aiohttp

from speechrl.rewards.api import Unscored
from speechrl.rewards.combine import batch_slice
from speechrl.rewards.wire import HEALTH_PATH, SCORE_PATH, WireError, decode_response, encode_request

log = logging.getLogger(__name__)

RETRYABLE = frozenset({429, 502, 503, 504})  # the server is busy, restarting or behind a proxy that lost it
HINTS = {
    400: "client and server disagree on the request schema (docs/rewards.md)",
    401: "set the environment variable named by kwargs.token_env to the server's token, where the reward worker runs",
    413: "lower kwargs.max_batch_size, or start the server with a larger --max-body-mb",
    500: "the reward on the server is broken; its log says why",
}


class RemoteRewardError(RuntimeError):
    """The server refused the request for a reason retrying cannot fix."""


class RemoteReward:
    """Scores a batch on a reward server: split into chunks of `max_batch_size`, at most
    `max_concurrency` in flight, each retried on timeouts, lost connections and 429/502/503/504."""

    def __init__(
        self,
        url: str,  # the server's base URL, e.g. http://127.0.0.1:8100
        token_env: Optional[str] = "SPEECHRL_REWARD_TOKEN",  # environment variable holding the bearer token
        timeout_s: float = 30.0,  # per request, connecting included
        retries: int = 2,  # further attempts after a failed one
        backoff_s: float = 0.5,  # sleep before retry k is backoff_s * 2**k, with jitter
        max_batch_size: int = 64,  # samples per request
        max_concurrency: int = 4,  # requests in flight at once
        send_audio: bool = True,  # send the batch's waveforms (base64 WAV); off for text-only rewards
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote: url {url!r} must start with http:// or https://")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or max_batch_size < 1 or max_concurrency < 1:
            raise ValueError(f"remote: need timeout_s > 0, retries >= 0, backoff_s >= 0, max_batch_size >= 1 and "
                             f"max_concurrency >= 1; got {timeout_s}, {retries}, {backoff_s}, {max_batch_size}, "
                             f"{max_concurrency}")
        self.url = url.rstrip("/")
        token = os.environ.get(token_env) if token_env else None
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.max_batch_size, self.max_concurrency, self.send_audio = max_batch_size, max_concurrency, send_audio
        # Fail at start-up, not at the first step after minutes of loading, if nothing answers.
        health, why = asyncio.run(self._health())
        if health is None:
            raise ConnectionError(f"remote: no reward server answers at {self.url}{HEALTH_PATH} ({why}); start one "
                                  "with `speechrl serve-reward NAME --port PORT`, or fix kwargs.url")
        log.info("remote: %s serves reward %r", self.url, health.get("reward"))

    async def __call__(self, completions: list[str], **columns: Any) -> dict[str, list[float]]:
        batch = {"completions": completions, **columns}
        n = len(completions)
        spans = [(start, min(start + self.max_batch_size, n)) for start in range(0, n, self.max_batch_size)]
        limit = asyncio.Semaphore(self.max_concurrency)
        async with self._session() as session:
            answers = await asyncio.gather(*(self._score(session, limit, batch_slice(batch, a, b), b - a)
                                             for a, b in spans))
        out: dict[str, list[float]] = {"reward": []}
        for (start, stop), (components, errors) in zip(spans, answers):
            for key in components:
                out.setdefault(key, [float("nan")] * start)
            for key, values in out.items():
                values.extend(components.get(key, [float("nan")] * (stop - start)))
            for i, why in errors.items():
                out["reward"][start + i] = Unscored(f"{self.url}: {why}")  # score_batch logs and counts these
        return out

    async def _score(self, session, limit, chunk: dict, size: int) -> tuple[dict[str, list[float]], dict[int, str]]:
        """(components, per-sample errors) of one chunk; a chunk that never got an answer is all errors."""
        body = encode_request(chunk, send_audio=self.send_audio)
        async with limit:
            answer, why = await self._attempts(lambda: session.post(self.url + SCORE_PATH, data=body))
        if answer is None:
            return {}, dict.fromkeys(range(size), why)
        try:
            return decode_response(answer, size)
        except WireError as e:
            raise RemoteRewardError(f"remote: {self.url}{SCORE_PATH}: {e}") from None

    async def _health(self) -> tuple[Optional[dict], str]:
        async with self._session() as session:
            return await self._attempts(lambda: session.get(self.url + HEALTH_PATH))

    def _session(self) -> aiohttp.ClientSession:
        # One session per batch: each async call runs on a fresh event loop (api.call_reward).
        return aiohttp.ClientSession(headers={"Content-Type": "application/json", **self.headers},
                                     timeout=aiohttp.ClientTimeout(total=self.timeout_s))

    async def _attempts(self, send: Callable[[], Awaitable]) -> tuple[Optional[dict], str]:
        return await with_retries(send, retries=self.retries, backoff_s=self.backoff_s, timeout_s=self.timeout_s,
                                  refuse=self._refuse)

    def _refuse(self, status: int, message: str) -> Exception:
        hint = HINTS.get(status, "see the server's log")
        return RemoteRewardError(f"remote: {self.url} answered {status}: {message}; {hint}")


async def with_retries(send: Callable[[], Awaitable], *, retries: int, backoff_s: float, timeout_s: float,
                       refuse: Callable[[int, str], Exception],
                       retryable: frozenset[int] = RETRYABLE) -> tuple[Optional[dict], str]:
    """(JSON answer, "") on success, (None, why) once the retries are spent. `send()` opens one
    request; a status outside `retryable` raises refuse(status, message): retrying cannot fix it."""
    began, why = time.monotonic(), ""
    for attempt in range(retries + 1):
        if attempt:
            await asyncio.sleep(backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0))
        try:
            async with send() as response:
                if response.status == 200:
                    return await response.json(), ""
                message = await _error_message(response)
                if response.status not in retryable:
                    raise refuse(response.status, message)
                why = f"HTTP {response.status}: {message}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            why = f"timed out after {timeout_s:g} s" if isinstance(e, asyncio.TimeoutError) else \
                f"{type(e).__name__}: {e}"
    return None, f"{why} ({retries + 1} attempts in {time.monotonic() - began:.1f} s)"


async def _error_message(response: aiohttp.ClientResponse) -> str:
    try:
        error = (await response.json())["error"]
        # ours is {"error": "why"}; OpenAI-compatible servers send {"error": {"message": "why", ...}}
        return str(error["message"] if isinstance(error, dict) and "message" in error else error)
    except Exception:  # noqa: BLE001 - not a JSON error: show the start of whatever was sent
        return (await response.text())[:200]
