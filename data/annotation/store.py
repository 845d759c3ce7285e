"""Every read and write of the annotation database, as plain functions over an engine.

The web app, the command line and the exporter all go through here, so the rules live in one place:
an annotator only ever reaches assignments that are theirs; a judgment is stored exactly once
however often (or however concurrently) it is submitted; undo retracts, never deletes.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Iterable, Optional

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from speechrl.data.annotation.db import (CHOICES, annotators, assignments, batches, clips, judgments, pairs)

MAX_COMMENT_CHARS = 2000
MAX_TAGS = 16


class AnnotationError(ValueError):
    """A request the store refuses; `status` is the HTTP status the app answers with."""

    status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NotFound(AnnotationError):
    status = 404


class Conflict(AnnotationError):
    status = 409


class Invalid(AnnotationError):
    status = 422


# --- annotators -----------------------------------------------------------------------------------
def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def add_annotator(engine: Engine, name: str, *, admin: bool = False) -> str:
    """Create annotator `name`; returns their sign-in token (shown once: only its hash is kept)."""
    name = name.strip()
    if not name or len(name) > 64 or not name.isprintable():
        raise Invalid(f"annotator name {name!r}: give 1-64 printable characters")
    token = secrets.token_urlsafe(32)
    try:
        with engine.begin() as conn:
            conn.execute(annotators.insert().values(name=name, token_hash=hash_token(token),
                                                    is_admin=admin, active=True))
    except IntegrityError:
        raise Conflict(f"annotator {name!r} already exists; use `speechrl annotate token {name}` "
                       "to give them a new token") from None
    return token


def new_token(engine: Engine, name: str) -> str:
    """Replace `name`'s token (the old one stops working at once); returns the new one."""
    token = secrets.token_urlsafe(32)
    with engine.begin() as conn:
        done = conn.execute(annotators.update().where(annotators.c.name == name)
                            .values(token_hash=hash_token(token), active=True)).rowcount
    if not done:
        raise NotFound(f"no annotator named {name!r}; add them with `speechrl annotate add-annotator {name}`")
    return token


def deactivate(engine: Engine, name: str) -> None:
    with engine.begin() as conn:
        if not conn.execute(annotators.update().where(annotators.c.name == name).values(active=False)).rowcount:
            raise NotFound(f"no annotator named {name!r}")


def annotator_for_token(engine: Engine, token: str) -> Optional[dict]:
    """The active annotator holding `token`, or None."""
    if not token or len(token) > 256:
        return None
    with engine.connect() as conn:
        row = conn.execute(sa.select(annotators).where(annotators.c.token_hash == hash_token(token),
                                                       annotators.c.active)).mappings().first()
    return dict(row) if row else None


def list_annotators(engine: Engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(
            sa.select(annotators.c.id, annotators.c.name, annotators.c.is_admin, annotators.c.active)
            .order_by(annotators.c.id)).mappings()]


# --- annotating -----------------------------------------------------------------------------------
def _live():
    return sa.and_(judgments.c.assignment_id == assignments.c.id, judgments.c.undone_at.is_(None))


def progress(conn: Connection, annotator_id: int) -> dict:
    total = conn.execute(sa.select(sa.func.count()).select_from(assignments)
                         .where(assignments.c.annotator_id == annotator_id)).scalar()
    done = conn.execute(sa.select(sa.func.count()).select_from(judgments.join(assignments))
                        .where(assignments.c.annotator_id == annotator_id, judgments.c.undone_at.is_(None))).scalar()
    return {"done": done, "total": total}


def next_task(engine: Engine, annotator_id: int) -> dict:
    """The annotator's first unanswered assignment (with what the page shows), or {"task": None}."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(assignments.c.id, assignments.c.pair_id, pairs.c.text, pairs.c.context,
                      pairs.c.voice_clip_id, batches.c.name.label("batch"), batches.c.mode, batches.c.tags,
                      batches.c.instructions)
            .select_from(assignments.join(pairs).join(batches))
            .where(assignments.c.annotator_id == annotator_id, ~sa.exists().where(_live()))
            .order_by(assignments.c.position).limit(1)).mappings().first()
        prog = progress(conn, annotator_id)
    if row is None:
        return {"task": None, "progress": prog}
    return {"task": {
        "id": row["id"], "batch": row["batch"], "mode": row["mode"], "text": row["text"],
        "context": row["context"], "has_voice": row["voice_clip_id"] is not None, "tags": row["tags"],
        "instructions": row["instructions"],
        "audio": {slot: f"/api/audio/{row['id']}/{slot}"
                  for slot in ("a", "b") + (("voice",) if row["voice_clip_id"] is not None else ())},
    }, "progress": prog}


def task_audio(engine: Engine, annotator_id: int, assignment_id: int, slot: str) -> bytes:
    """The wav bytes behind slot "a", "b" or "voice" of one of the annotator's own assignments."""
    if slot not in ("a", "b", "voice"):
        raise NotFound(f"no audio slot {slot!r}; slots are a, b and voice")
    with engine.connect() as conn:
        row = conn.execute(sa.select(assignments.c.a_is_first, pairs.c.first_clip_id, pairs.c.second_clip_id,
                                     pairs.c.voice_clip_id)
                           .select_from(assignments.join(pairs))
                           .where(assignments.c.id == assignment_id,
                                  assignments.c.annotator_id == annotator_id)).first()
        if row is None:  # someone else's task looks exactly like a task that does not exist
            raise NotFound(f"no task {assignment_id} for you")
        first, second = (row.first_clip_id, row.second_clip_id) if row.a_is_first else (row.second_clip_id,
                                                                                         row.first_clip_id)
        clip_id = {"a": first, "b": second, "voice": row.voice_clip_id}[slot]
        if clip_id is None:
            raise NotFound(f"task {assignment_id} has no voice reference")
        return conn.execute(sa.select(clips.c.wav).where(clips.c.id == clip_id)).scalar()


@dataclass
class Submission:
    assignment_id: int
    submission_id: str
    choice: str
    tags: list[str] = field(default_factory=list)
    comment: str = ""
    played_a: bool = False
    played_b: bool = False
    seconds: Optional[float] = None


def submit(engine: Engine, annotator_id: int, sub: Submission) -> tuple[dict, bool]:
    """Store one answer; returns (the stored judgment, created).

    Exactly once: a retry with the same submission_id returns the stored judgment (created=False);
    a second, different answer to an answered assignment is a Conflict (undo first). Checked by
    the database's unique indexes, not by a read-then-write, so it holds across processes.
    """
    if sub.choice not in CHOICES:
        raise Invalid(f"choice {sub.choice!r} is not one of {list(CHOICES)}")
    if not (8 <= len(sub.submission_id) <= 64) or not sub.submission_id.isprintable():
        raise Invalid("submission_id must be 8-64 printable characters (the page draws a UUID per answer)")
    if len(sub.comment) > MAX_COMMENT_CHARS:
        raise Invalid(f"comment is {len(sub.comment)} characters; at most {MAX_COMMENT_CHARS}")
    if len(sub.tags) > MAX_TAGS or len(set(sub.tags)) != len(sub.tags):
        raise Invalid(f"tags must be distinct and at most {MAX_TAGS}, got {sub.tags}")
    if sub.seconds is not None and not (0 <= sub.seconds < 86400):
        raise Invalid(f"seconds {sub.seconds} is not a time on task")
    with engine.connect() as conn:
        found = _by_submission(conn, sub.submission_id)
        if found is not None:
            return _same_submission(found, annotator_id, sub), False
        row = conn.execute(sa.select(assignments.c.a_is_first, batches.c.tags)
                           .select_from(assignments.join(pairs).join(batches))
                           .where(assignments.c.id == sub.assignment_id,
                                  assignments.c.annotator_id == annotator_id)).first()
    if row is None:
        raise NotFound(f"no task {sub.assignment_id} for you")
    unknown = sorted(set(sub.tags) - set(row.tags))
    if unknown:
        raise Invalid(f"unknown tags {unknown}; this batch's tags are {row.tags}")
    preferred = {"A": "first" if row.a_is_first else "second",
                 "B": "second" if row.a_is_first else "first"}.get(sub.choice, sub.choice)
    values = dict(assignment_id=sub.assignment_id, submission_id=sub.submission_id, choice=sub.choice,
                  preferred=preferred, tags=list(sub.tags), comment=sub.comment, played_a=sub.played_a,
                  played_b=sub.played_b, seconds=sub.seconds)
    try:
        with engine.begin() as conn:
            new_id = conn.execute(judgments.insert().values(**values)).inserted_primary_key[0]
    except IntegrityError:
        with engine.connect() as conn:  # which unique index refused it?
            found = _by_submission(conn, sub.submission_id)
        if found is not None:  # the same submission, racing itself
            return _same_submission(found, annotator_id, sub), False
        raise Conflict(f"task {sub.assignment_id} is already answered; undo that answer first") from None
    return {"id": new_id, **values}, True


def _by_submission(conn: Connection, submission_id: str) -> Optional[dict]:
    row = conn.execute(sa.select(judgments, assignments.c.annotator_id).select_from(judgments.join(assignments))
                       .where(judgments.c.submission_id == submission_id)).mappings().first()
    return dict(row) if row else None


def _same_submission(found: dict, annotator_id: int, sub: Submission) -> dict:
    if found["annotator_id"] != annotator_id or found["assignment_id"] != sub.assignment_id \
            or found["choice"] != sub.choice:
        raise Conflict(f"submission_id {sub.submission_id!r} was already used for another answer; "
                       "draw a new one per answer")
    return {k: v for k, v in found.items() if k != "annotator_id"}


def sides(engine: Engine, assignment_id: int) -> tuple[bool, dict, dict]:
    """(a_is_first, first_meta, second_meta) of an assignment: for scripted annotators, never the app."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(assignments.c.a_is_first, pairs.c.first_meta, pairs.c.second_meta)
                           .select_from(assignments.join(pairs)).where(assignments.c.id == assignment_id)).one()
    return row.a_is_first, row.first_meta, row.second_meta


def undo_last(engine: Engine, annotator_id: int) -> int:
    """Retract the annotator's latest live answer; returns its assignment id (now open again)."""
    with engine.begin() as conn:
        last = conn.execute(sa.select(judgments.c.id, judgments.c.assignment_id)
                            .select_from(judgments.join(assignments))
                            .where(assignments.c.annotator_id == annotator_id, judgments.c.undone_at.is_(None))
                            .order_by(judgments.c.id.desc()).limit(1)).first()
        if last is None:
            raise Conflict("nothing to undo: you have no answers yet")
        conn.execute(judgments.update().where(judgments.c.id == last.id, judgments.c.undone_at.is_(None))
                     .values(undone_at=sa.func.current_timestamp()))
    return last.assignment_id


# --- reading it all back --------------------------------------------------------------------------
def live_judgments(engine: Engine, batch: Optional[str] = None) -> list[dict]:
    """Every live judgment with its pair and annotator, oldest first (for export and statistics)."""
    query = (sa.select(judgments.c.id, judgments.c.preferred, judgments.c.choice, judgments.c.tags,
                       judgments.c.comment, judgments.c.seconds, judgments.c.created_at,
                       judgments.c.played_a, judgments.c.played_b,
                       assignments.c.pair_id, annotators.c.name.label("annotator"),
                       batches.c.name.label("batch"))
             .select_from(judgments.join(assignments).join(annotators).join(pairs).join(batches))
             .where(judgments.c.undone_at.is_(None)).order_by(judgments.c.id))
    if batch is not None:
        query = query.where(batches.c.name == batch)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def pairs_of(engine: Engine, pair_ids: Iterable[int]) -> dict[int, dict]:
    ids = sorted(set(pair_ids))
    with engine.connect() as conn:
        rows = conn.execute(sa.select(pairs, batches.c.name.label("batch"), batches.c.mode)
                            .select_from(pairs.join(batches)).where(pairs.c.id.in_(ids))).mappings()
        return {r["id"]: dict(r) for r in rows}


def clip_bytes(engine: Engine, clip_id: int) -> bytes:
    with engine.connect() as conn:
        return conn.execute(sa.select(clips.c.wav).where(clips.c.id == clip_id)).scalar()


def queue_counts(engine: Engine) -> list[dict]:
    """Per annotator: assigned and answered, for the admin page."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(annotators.c.name, annotators.c.active,
                      sa.func.count(assignments.c.id).label("assigned"),
                      sa.func.count(judgments.c.id).label("answered"),
                      sa.func.max(judgments.c.created_at).label("last_answer"))
            .select_from(annotators.outerjoin(assignments).outerjoin(judgments, _live()))
            .group_by(annotators.c.id, annotators.c.name, annotators.c.active).order_by(annotators.c.name)
        ).mappings()
        return [dict(r) for r in rows]


def list_batches(engine: Engine) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(batches.c.name, batches.c.mode, batches.c.strategy, batches.c.votes_per_pair,
                      batches.c.source, sa.func.count(sa.distinct(pairs.c.id)).label("pairs"))
            .select_from(batches.outerjoin(pairs)).group_by(batches.c.id).order_by(batches.c.id)).mappings()
        return [dict(r) for r in rows]

