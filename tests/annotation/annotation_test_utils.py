"""Small real batches for the annotation tests: espeak-ng-free audio (tones and noise, real wav
bytes through the clip store), annotators with their tokens."""
from __future__ import annotations

import numpy as np

from speechrl.data.annotation import store
from speechrl.data.annotation.batches import Batch, PairSpec, Side, create_batch

RATE = 16000


def tone(freq: float, seconds: float = 0.4, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def make_specs(n: int, *, voice: bool = False) -> list[PairSpec]:
    """n pairs, each of two different clips; the first always has the higher 'reward'."""
    return [PairSpec(key=f"p{i}", text=f"sentence number {i}",
                     first=Side(tone(200 + 10 * i), RATE, {"source": "step-30", "reward": 1.0}),
                     second=Side(tone(205 + 10 * i), RATE, {"source": "step-0", "reward": 0.0}),
                     voice=Side(tone(100), RATE) if voice else None)
            for i in range(n)]


def make_batch(engine, names: list[str], n_pairs: int = 6, votes: int = 2, name: str = "b1",
               admin: tuple[str, ...] = (), voice: bool = False) -> tuple[dict[str, str], dict]:
    """Annotators `names` (tokens returned) and a batch of n_pairs pairs, `votes` annotators each."""
    tokens = {n: store.add_annotator(engine, n, admin=n in admin) for n in names}
    made = create_batch(engine, Batch(name=name, mode="tts", strategy="test", source="tests",
                                            tags=["intelligibility", "naturalness"], instructions="pick one",
                                            votes_per_pair=votes),
                              make_specs(n_pairs, voice=voice), names, seed=1)
    return tokens, made


def annotator_id(engine, name: str) -> int:
    return next(a["id"] for a in store.list_annotators(engine) if a["name"] == name)


class LiveServer:
    """The app under a real uvicorn server on a loopback port, in a thread of this process."""

    def __init__(self, engine):
        import socket
        import threading

        import uvicorn

        from speechrl.data.annotation.app import create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        import time

        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the annotation app did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
