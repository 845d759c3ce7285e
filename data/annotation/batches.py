"""Batches of pairwise tasks: the clips into the clip store, the pairs, and who annotates each.

`speechrl annotate tasks` builds PairSpecs from a run's samples (tasks.py) and hands them here.
"""
from __future__ import annotations

import hashlib
import io
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import soundfile as sf
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from speechrl.data.annotation.db import annotators, assignments, batches, clips, pairs
from speechrl.data.annotation.store import Conflict, Invalid, NotFound


# --- the clip store -------------------------------------------------------------------------------
def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(audio, np.float32), -1, 1), sample_rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def put_clip(conn: Connection, audio: np.ndarray, sample_rate: int) -> int:
    """Store a clip once (keyed by the hash of its wav bytes); returns its id."""
    data = wav_bytes(audio, sample_rate)
    digest = hashlib.sha256(data).hexdigest()
    found = conn.execute(sa.select(clips.c.id).where(clips.c.sha256 == digest)).scalar()
    if found is not None:
        return found
    return conn.execute(clips.insert().values(sha256=digest, wav=data, sample_rate=sample_rate,
                                              seconds=len(audio) / sample_rate)).inserted_primary_key[0]


# --- batches of tasks -----------------------------------------------------------------------------
@dataclass
class Side:
    audio: np.ndarray
    sample_rate: int
    meta: dict = field(default_factory=dict)  # where it came from: {"source": "step-30", "reward": 0.4}


@dataclass
class PairSpec:
    key: str
    text: str
    first: Side
    second: Side
    context: dict = field(default_factory=dict)  # {"persona": ..., "history": ...}
    voice: Optional[Side] = None


@dataclass
class Batch:
    name: str
    mode: str
    strategy: str
    source: str
    tags: list[str]
    instructions: str
    votes_per_pair: int


def create_batch(engine: Engine, batch: Batch, specs: list[PairSpec], annotator_names: list[str],
                 *, seed: int = 0) -> dict:
    """Store a batch: its clips, pairs, and `votes_per_pair` assignments per pair.

    Each pair goes to that many different annotators, the least loaded first, so the work
    stays even; each annotator's queue is in a random order and every assignment draws its own
    A/B order (recorded in `a_is_first`).
    """
    if not specs:
        raise Invalid(f"batch {batch.name!r}: no pairs to annotate")
    if batch.votes_per_pair < 1:
        raise Invalid(f"votes per pair must be >= 1, got {batch.votes_per_pair}")
    if len(set(annotator_names)) < batch.votes_per_pair:
        raise Invalid(f"each pair goes to {batch.votes_per_pair} different annotators, but only "
                      f"{len(set(annotator_names))} were named ({', '.join(annotator_names) or 'none'}); "
                      "name more annotators or lower the votes per pair")
    rng = random.Random(seed)
    with engine.begin() as conn:
        people = {r.name: r.id for r in conn.execute(
            sa.select(annotators.c.name, annotators.c.id).where(annotators.c.name.in_(annotator_names)))}
        missing = sorted(set(annotator_names) - set(people))
        if missing:
            raise NotFound(f"no annotators named {missing}; add them first with `speechrl annotate add-annotator NAME`")
        if conn.execute(sa.select(batches.c.id).where(batches.c.name == batch.name)).first():
            raise Conflict(f"a batch named {batch.name!r} already exists; choose another --name")
        batch_id = conn.execute(batches.insert().values(**batch.__dict__)).inserted_primary_key[0]
        queues = {r.annotator_id: r for r in conn.execute(
            sa.select(assignments.c.annotator_id, sa.func.count().label("n"), sa.func.max(assignments.c.position)
                      .label("last")).where(assignments.c.annotator_id.in_(people.values()))
            .group_by(assignments.c.annotator_id))}
        load = {name: queues[pid].n if pid in queues else 0 for name, pid in people.items()}
        next_pos = {name: queues[pid].last + 1 if pid in queues else 1 for name, pid in people.items()}
        order = list(range(len(specs)))
        rng.shuffle(order)
        rows, identical = [], 0
        for i in order:
            spec = specs[i]
            # Which side is stored "first" is drawn too: strategies hand pairs over in an order (reward_gap:
            # the higher reward first), and a vote label that tracks it would load kappa's chance term.
            one, two = (spec.first, spec.second) if rng.random() < 0.5 else (spec.second, spec.first)
            first = put_clip(conn, one.audio, one.sample_rate)
            second = put_clip(conn, two.audio, two.sample_rate)
            if first == second:  # the same audio twice (e.g. a checkpoint that did not change): nothing to judge
                identical += 1
                continue
            pair_id = conn.execute(pairs.insert().values(
                batch_id=batch_id, key=spec.key, text=spec.text, context=spec.context,
                voice_clip_id=put_clip(conn, spec.voice.audio, spec.voice.sample_rate) if spec.voice else None,
                first_clip_id=first, second_clip_id=second,
                first_meta=_jsonable(one.meta), second_meta=_jsonable(two.meta),
            )).inserted_primary_key[0]
            names = sorted(people, key=lambda n: (load[n], rng.random()))[: batch.votes_per_pair]
            for name in names:
                rows.append(dict(pair_id=pair_id, annotator_id=people[name], position=next_pos[name],
                                 a_is_first=rng.random() < 0.5))
                load[name] += 1
                next_pos[name] += 1
        if not rows:
            raise Invalid(f"batch {batch.name!r}: all {len(specs)} pairs hold the same audio twice; nothing to judge")
        conn.execute(assignments.insert(), rows)
    per_id = Counter(r["annotator_id"] for r in rows)
    return {"batch_id": batch_id, "pairs": len(specs) - identical, "identical": identical, "assignments": len(rows),
            "per_annotator": {n: per_id[pid] for n, pid in people.items()}}


def _jsonable(meta: dict) -> dict:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in meta.items()}
