"""A tiny OpenAI-compatible server for the persona-judge tests: `/v1/completions` and
`/v1/chat/completions` with logprobs, answered by a local causal LM through transformers.

A real HTTP server on 127.0.0.1 (a free port), so the judge's client code runs unchanged against
it. Greedy only (temperature is ignored), `top_logprobs` as large as asked (the tests ask for the
whole vocabulary to compare with in-process scores).
"""
from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import torch


class _Handler(BaseHTTPRequestHandler):
    judge = None  # a speechrl.rewards.judge_backends.TransformersJudge
    api_key: Optional[str] = None
    lock = threading.Lock()  # one forward pass at a time
    requests = 0

    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.api_key and self.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._send(401, {"error": {"message": "invalid API key"}})
        chat = self.path == "/v1/chat/completions"
        if not chat and self.path != "/v1/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        tokenizer = self.judge.tokenizer
        prompt = (tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
                  if chat else body["prompt"])
        k = int(body.get("top_logprobs", 0) if chat else body.get("logprobs") or 0)
        with self.lock:
            type(self).requests += 1
            text, first, top = self._complete(prompt, int(body.get("max_tokens", 16)), k)
        if chat:
            logprobs = {"content": [{"token": first[0], "logprob": first[1],
                                     "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top]}]} if k else None
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": "length"}
        else:
            logprobs = {"tokens": [first[0]], "token_logprobs": [first[1]], "top_logprobs": [dict(top)],
                        "text_offset": [0]} if k else None
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "length"}
        self._send(200, {"id": "cmpl-test", "object": "chat.completion" if chat else "text_completion",
                         "model": body.get("model"), "choices": [choice]})

    def _complete(self, prompt: str, max_tokens: int, k: int):
        """Greedy text (cut at a newline), the first token with its logprob, and the top-k."""
        tokenizer, model = self.judge.tokenizer, self.judge.model
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        logprobs = self.judge.full_logprobs(prompt)
        first_id = int(logprobs.argmax())
        first = (tokenizer.decode([first_id]), float(logprobs[first_id]))
        values, indices = logprobs.topk(min(k, logprobs.numel())) if k else (torch.empty(0), torch.empty(0))
        top = [(tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, indices)]
        if max_tokens > 1:
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]
        else:
            text = first[0]
        return text, first, top


@contextmanager
def openai_server(judge, api_key: Optional[str] = None):
    """Serve `judge` (a TransformersJudge) on 127.0.0.1; yields (base URL ending in /v1, handler class)."""
    handler = type("Handler", (_Handler,), {"judge": judge, "api_key": api_key, "requests": 0,
                                            "lock": threading.Lock()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
