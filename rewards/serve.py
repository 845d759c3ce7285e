"""`speechrl serve-reward`: any reward the registry finds, served over HTTP for `remote` rewards.

aiohttp serves (it comes with ray[default], and gives body-size limits, 413 included, without
extra code); scoring runs on a small thread pool so that a slow reward never blocks the health
endpoint, and requests beyond `max_pending` get 503 at once instead of queueing without bound.
The schema is in wire.py. Loopback by default; any other address needs a bearer token.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

from aiohttp import web

from speechrl.rewards.combine import RewardOutputError, batch_size, score_rewards
from speechrl.rewards.wire import HEALTH_PATH, SCORE_PATH, WireError, decode_request, encode_response

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


class RewardServer:
    def __init__(self, name: str, reward: Callable, token: Optional[str], max_body_bytes: int, workers: int,
                 max_pending: int):
        if workers < 1 or max_pending < 1 or max_body_bytes < 1:
            raise ValueError(f"serve-reward: --workers ({workers}), --max-pending ({max_pending}) and "
                             "--max-body-mb must be positive")
        self.name, self.reward, self.token = name, reward, token
        self.max_body_bytes, self.max_pending = max_body_bytes, max_pending
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward")
        self.pending = self.requests = self.samples = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._auth])
        app.router.add_get(HEALTH_PATH, self.health)
        app.router.add_post(SCORE_PATH, self.score)
        return app

    async def start(self, host: str, port: int) -> tuple[web.AppRunner, str]:
        """Listen on host:port (0 = a free port); returns the runner (its cleanup() stops) and the URL."""
        if not is_loopback(host) and not self.token:
            raise ValueError(f"serve-reward: refusing to listen on {host} without a token: anyone who reaches it "
                             "could use the reward; set the token's environment variable (--token-env) or use 127.0.0.1")
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        bound_host, bound_port = runner.addresses[0][:2]
        return runner, f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        sent = request.headers.get("Authorization", "").encode()
        if request.path != HEALTH_PATH and self.token and not hmac.compare_digest(sent, f"Bearer {self.token}".encode()):
            return _error(401, "missing or wrong bearer token; send the header 'Authorization: Bearer <token>'")
        return await handler(request)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "reward": self.name, "requests": self.requests,
                                  "samples": self.samples, "pending": self.pending})

    async def score(self, request: web.Request) -> web.Response:
        if self.pending >= self.max_pending:
            return _error(503, f"busy: {self.pending} requests are waiting; retry later", {"Retry-After": "1"})
        self.pending += 1
        try:
            body = await request.read()
            answer, n = await asyncio.get_running_loop().run_in_executor(self.pool, self._score, body)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"body over the server's limit of {self.max_body_bytes / 2**20:g} MiB; send smaller "
                          "batches (the remote reward's max_batch_size) or raise --max-body-mb")
        except WireError as e:
            return _error(400, str(e))
        except (RewardOutputError, RuntimeError) as e:  # the reward itself is broken, not the request
            log.error("reward %r failed: %s", self.name, e)
            return _error(500, f"reward {self.name!r} failed: {e}")
        finally:
            self.pending -= 1
        self.requests, self.samples = self.requests + 1, self.samples + n  # on the loop's thread: no race
        return web.json_response(answer)

    def _score(self, body: bytes) -> tuple[dict[str, Any], int]:
        batch = decode_request(body)
        return encode_response(score_rewards({self.name: self.reward}, batch), self.name), batch_size(batch)


def _error(status: int, message: str, headers: Optional[dict] = None) -> web.Response:
    if status != 401:
        log.warning("answered %d: %s", status, message)
    return web.json_response({"error": message}, status=status, headers=headers)


def serve(server: RewardServer, host: str, port: int) -> None:
    """Serve until interrupted; prints the URL first (with --port 0 it is the only way to learn the port)."""
    async def main() -> None:
        runner, url = await server.start(host, port)
        print(f"serving reward {server.name!r} on {url} (POST {SCORE_PATH}, GET {HEALTH_PATH})", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
