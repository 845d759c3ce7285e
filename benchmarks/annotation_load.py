"""Load on the annotation app: many annotators at once, on loopback, against a real server process.

Each simulated annotator signs in with its token and works through its queue over HTTP like the
page does: next task, fetch A and B, answer; some answers are sent twice (a retry after a lost
response), some race a second, different answer for the same task, some are undone and answered
again. Afterwards the database must hold exactly one live judgment per task and one row per
accepted answer.

    python benchmarks/annotation_load.py                       # SQLite (WAL) in a temp folder
    python benchmarks/annotation_load.py --db postgresql://user@127.0.0.1:5432/db   # an empty PostgreSQL database

tests/annotation/test_load.py runs `run_load` on both engines, smaller.
"""
from __future__ import annotations

import argparse
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`speechrl annotate serve` in its own process on a free loopback port."""

    def __init__(self, db_url: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "speechrl.rlhf.cli.main", "annotate", "--db", db_url, "serve",
                    "--port", str(self.port)]

    def __enter__(self) -> "ServerProcess":
        import httpx

        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the annotation server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/api/me", timeout=1).status_code == 401:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("the annotation server did not answer within 60 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def annotate_queue(url: str, token: str, seed: int, retry_p: float = 0.3, race_p: float = 0.1,
                   undo_p: float = 0.1) -> dict:
    """One annotator's whole queue over HTTP; returns what the server told it."""
    import httpx

    rng = random.Random(seed)
    accepted, undone, statuses, latencies, paths = [], [], Counter(), [], Counter()
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        def call(method, path, **kw):
            began = time.perf_counter()
            res = client.request(method, path, **kw)
            latencies.append(time.perf_counter() - began)
            statuses[res.status_code] += 1
            return res

        while (task := call("GET", "/api/next").json()["task"]) is not None:
            for slot in ("a", "b"):
                assert call("GET", task["audio"][slot]).status_code == 200
            body = {"assignment_id": task["id"], "submission_id": uuid.uuid4().hex,
                    "choice": rng.choice(["A", "B", "tie", "both_bad"]), "played_a": True, "played_b": True}
            if rng.random() < race_p:  # two different answers at once: exactly one may land
                rival = {**body, "submission_id": uuid.uuid4().hex, "choice": "tie"}
                with ThreadPoolExecutor(2) as pool:
                    results = list(pool.map(lambda b: (b, call("POST", "/api/judgments", json=b)), (body, rival)))
                won = [(b, r) for b, r in results if r.status_code == 201]
                assert len(won) == 1 and all(r.status_code in (201, 409) for _, r in results), \
                    [r.status_code for _, r in results]
                body = won[0][0]
                accepted.append(body["submission_id"])
                paths["races"] += 1
            else:
                res = call("POST", "/api/judgments", json=body)
                assert res.status_code == 201, res.text
                accepted.append(body["submission_id"])
            if rng.random() < retry_p:  # the response was "lost": the same submission again
                again = call("POST", "/api/judgments", json=body)
                assert again.status_code == 200 and not again.json()["created"], again.text
                paths["retries"] += 1
            if rng.random() < undo_p:
                assert call("POST", "/api/undo").json()["reopened"] == task["id"]
                undone.append(accepted[-1])
                paths["undos"] += 1
    return {"accepted": accepted, "undone": undone, "statuses": statuses, "latencies": latencies, "paths": paths}


def run_load(url: str, tokens: dict[str, str], *, seed: int = 0, **kw) -> dict:
    """All annotators at once, one thread each."""
    began = time.perf_counter()
    with ThreadPoolExecutor(len(tokens)) as pool:
        results = list(pool.map(lambda item: annotate_queue(url, item[1], seed + item[0], **kw),
                                enumerate(tokens.values())))
    wall = time.perf_counter() - began
    latencies = [x for r in results for x in r["latencies"]]
    return {"accepted": [s for r in results for s in r["accepted"]], "undone": [s for r in results for s in r["undone"]],
            "statuses": sum((r["statuses"] for r in results), Counter()), "wall": wall,
            "paths": sum((r["paths"] for r in results), Counter()),
            "requests": len(latencies), "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * float(np.percentile(latencies, 95))}


def check_stored_once(engine, outcome: dict, n_assignments: int) -> None:
    """Every accepted answer is one row; every task has exactly one live answer; nothing else."""
    import sqlalchemy as sa

    from speechrl.data.annotation.db import judgments

    with engine.connect() as conn:
        rows = conn.execute(sa.select(judgments.c.submission_id, judgments.c.assignment_id,
                                      judgments.c.undone_at)).all()
    ids = [r.submission_id for r in rows]
    assert sorted(ids) == sorted(outcome["accepted"]), "rows differ from the answers the server accepted"
    assert len(ids) == len(set(ids)), "a submission was stored twice"
    live = Counter(r.assignment_id for r in rows if r.undone_at is None)
    assert len(live) == n_assignments and set(live.values()) == {1}, "a task has no or several live answers"
    assert {r.submission_id for r in rows if r.undone_at is not None} == set(outcome["undone"])


def make_load_batch(engine, annotators: int, pairs: int, votes: int) -> tuple[dict[str, str], int]:
    from speechrl.data.annotation import store
    from speechrl.data.annotation.batches import Batch, PairSpec, Side, create_batch

    rng = np.random.default_rng(0)
    names = [f"load{i:03d}" for i in range(annotators)]
    tokens = {n: store.add_annotator(engine, n) for n in names}
    specs = [PairSpec(f"p{i}", f"text {i}", Side(rng.uniform(-.3, .3, 4000).astype(np.float32), 16000),
                      Side(rng.uniform(-.3, .3, 4000).astype(np.float32), 16000)) for i in range(pairs)]
    made = create_batch(engine, Batch("load", "tts", "load", "benchmark", ["naturalness"], "", votes),
                              specs, names)
    return tokens, made["assignments"]


def main() -> None:
    from speechrl.data.annotation.db import open_db

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", help="an EMPTY database URL (default: a new SQLite file in a temp folder)")
    ap.add_argument("--annotators", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--votes", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.db or f"sqlite:///{Path(tmp) / 'load.db'}"
        engine = open_db(url)
        tokens, n = make_load_batch(engine, args.annotators, args.pairs, args.votes)
        with ServerProcess(url) as server:
            out = run_load(server.url, tokens)
        check_stored_once(engine, out, n)
        print("| database | annotators | tasks | requests | wall s | requests/s | p50 ms | p95 ms | statuses |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        print(f"| {engine.dialect.name} | {args.annotators} | {n} | {out['requests']} | {out['wall']:.1f} | "
              f"{out['requests'] / out['wall']:.0f} | {out['p50_ms']:.0f} | {out['p95_ms']:.0f} | "
              f"{dict(sorted(out['statuses'].items()))} |")
        print(f"every accepted judgment stored exactly once ({len(out['accepted'])} rows, {len(out['undone'])} undone)")


if __name__ == "__main__":
    main()
