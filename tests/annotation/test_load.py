"""A bounded load test on loopback: many annotators at once against a real `speechrl annotate
serve` process, on both engines; every accepted judgment must be stored exactly once (retries,
racing answers and undos included). The larger version with timings is benchmarks/annotation_load.py."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from annotation_load import ServerProcess, check_stored_once, make_load_batch, run_load  # noqa: E402
from speechrl.data.annotation.db import open_db  # noqa: E402


def test_concurrent_annotators_store_every_judgment_exactly_once(db_url):
    engine = open_db(db_url)
    tokens, n_tasks = make_load_batch(engine, annotators=12, pairs=30, votes=3)
    with ServerProcess(db_url) as server:
        # retry_p / race_p / undo_p high enough that every path runs many times
        out = run_load(server.url, tokens, seed=7, retry_p=0.4, race_p=0.25, undo_p=0.15)
    assert min(out["paths"][k] for k in ("races", "retries", "undos")) >= 5, out["paths"]  # every path ran
    assert out["statuses"][409] == out["paths"]["races"]  # each race: one answer landed, the other refused
    assert set(out["statuses"]) <= {200, 201, 409}
    check_stored_once(engine, out, n_tasks)
    engine.dispose()
