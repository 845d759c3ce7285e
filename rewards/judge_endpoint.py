"""An LLM judge behind any OpenAI-compatible server: the third backend of judge_backends.py, asked
the same two things (`next_logprobs`, `generate`) over HTTP. Requests, timeouts and retries are
remote.py's (`with_retries`), with this API's own statuses and hints."""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Optional

from speechrl.rewards.judge_cache import cache_key
from speechrl.rewards.remote import with_retries

log = logging.getLogger(__name__)

RETRYABLE = frozenset({429, 500, 502, 503, 504})  # a model server's 500 is usually an overloaded engine
HINTS = {401: "set the API key's environment variable where the reward worker runs",
         404: "check `endpoint` (it usually ends in /v1) and the model name"}


class OpenAIJudge:
    """A judge behind an OpenAI-compatible server (vLLM's `vllm serve`, llama.cpp, TGI, a hosted
    API). `api="completions"` sends the prompt text as it is, cue included (`/completions` with
    `logprobs`); `api="chat"` sends the body as a user message (`/chat/completions` with
    `top_logprobs`) and reads the first token of the answer. Requests go out concurrently, each
    with a timeout, retried on timeouts, lost connections and 429/5xx; what still fails comes
    back as an error string in place of that prompt's answer."""

    def __init__(self, endpoint: str, model: str, *, api: str = "completions", api_key_env: Optional[str] = None,
                 top_logprobs: int = 20, timeout_s: float = 60.0, retries: int = 2, backoff_s: float = 0.5,
                 max_concurrency: int = 8):
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"persona judge: endpoint {endpoint!r} must start with http:// or https:// "
                             "(e.g. http://127.0.0.1:8000/v1)")
        if api not in ("completions", "chat"):
            raise ValueError(f"persona judge: api={api!r}; use 'completions' or 'chat'")
        if not model:
            raise ValueError("persona judge: with an endpoint, `model` is the served model's name; set it")
        self.url, self.model, self.api = endpoint.rstrip("/"), model, api
        self.path = "/chat/completions" if api == "chat" else "/completions"
        # a chat answer cannot be prefilled: no two-token ratings, no "Rating: 4\nReason:"
        self.continues = api != "chat"
        key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and key is None:
            log.warning("persona judge: environment variable %s is not set; calling %s without an API key",
                        api_key_env, self.url)
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        self.top_logprobs, self.timeout_s, self.retries, self.backoff_s = top_logprobs, timeout_s, retries, backoff_s
        self.max_concurrency = max_concurrency
        self.fingerprint = cache_key(self.url, model, api)[:16]
        self.calls = 0

    def format(self, body: str, cue: str) -> str:
        # chat: the server applies the model's template; the cue cannot open the assistant's turn there
        return body + cue if self.continues else body

    def next_logprobs(self, prompts: list[str], wanted: frozenset[str], at_start: bool) -> list[Any]:
        """{token text: logprob} per prompt (the server's top-k), or the error string for a prompt
        that got no answer."""
        out: list[Any] = []
        for answer in self._post_all(prompts, max_tokens=1, logprobs=True):
            if isinstance(answer, str):
                out.append(answer)
                continue
            top = _first_top_logprobs(answer, self.api)
            out.append(top if top is not None else f"{self.url} returned no logprobs; does it support them?")
        return out

    def generate(self, prompts: list[str], max_tokens: int) -> list[str]:
        texts = []
        for answer in self._post_all(prompts, max_tokens=max_tokens, logprobs=False):
            if isinstance(answer, str):
                texts.append(f"(no rationale: {answer})")
            elif self.api == "chat":
                texts.append((answer["choices"][0]["message"]["content"] or "").strip())
            else:
                texts.append((answer["choices"][0]["text"] or "").strip().split("\n")[0])
        return texts

    def _post_all(self, prompts: list[str], *, max_tokens: int, logprobs: bool) -> list[Any]:
        self.calls += 1
        return asyncio.run(self._gather(prompts, max_tokens, logprobs))

    async def _gather(self, prompts: list[str], max_tokens: int, logprobs: bool) -> list[Any]:
        import aiohttp

        limit = asyncio.Semaphore(self.max_concurrency)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(headers=self.headers, timeout=timeout) as session:
            return await asyncio.gather(*(self._post(session, limit, self._body(p, max_tokens, logprobs))
                                          for p in prompts))

    def _body(self, prompt: str, max_tokens: int, logprobs: bool) -> dict:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": 0.0}
        if self.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
            if logprobs:
                body.update(logprobs=True, top_logprobs=self.top_logprobs)
        else:
            body["prompt"] = prompt
            if logprobs:
                body["logprobs"] = self.top_logprobs
            else:
                body["stop"] = ["\n"]
        return body

    async def _post(self, session, limit, body: dict) -> Any:
        """The JSON answer, or why there is none after the retries; raises on 400/401/403/404."""
        async with limit:
            answer, why = await with_retries(lambda: session.post(self.url + self.path, json=body),
                                             retries=self.retries, backoff_s=self.backoff_s,
                                             timeout_s=self.timeout_s, refuse=self._refuse, retryable=RETRYABLE)
        return answer if answer is not None else f"{self.url}{self.path}: {why}"

    def _refuse(self, status: int, message: str) -> Exception:
        return RuntimeError(f"persona judge: {self.url}{self.path} answered {status}: {message}; "
                            f"{HINTS.get(status, 'see the server log')}")


def _first_top_logprobs(answer: dict, api: str) -> Optional[dict[str, float]]:
    """{token text: logprob} of the answer's first token, from either API's response shape."""
    try:
        logprobs = answer["choices"][0]["logprobs"]
        if api == "chat":
            return {t["token"]: float(t["logprob"]) for t in logprobs["content"][0]["top_logprobs"]}
        return {str(t): float(lp) for t, lp in logprobs["top_logprobs"][0].items()}
    except (KeyError, IndexError, TypeError):
        return None
