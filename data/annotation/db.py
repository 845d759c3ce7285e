"""The annotation database: tables, engines and the migrations that make them.

One schema for SQLite (WAL, so annotators' writes never block the admin's reads) and PostgreSQL,
created and upgraded only by Alembic migrations, never `create_all`, so older databases upgrade in
place. Tokens are stored as SHA-256 (32 random bytes need no password KDF). Judgments are never
updated or deleted (undo stamps `undone_at`); a unique `submission_id` makes retries idempotent.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

from speechrl.data.annotation import DEFAULT_URL_ENV

metadata = sa.MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})

NOW = sa.func.current_timestamp()

annotators = sa.Table(
    "annotators", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("is_admin", sa.Boolean, nullable=False, default=False),
    sa.Column("active", sa.Boolean, nullable=False, default=True),
    sa.Column("created_at", sa.DateTime, nullable=False, server_default=NOW),
)

clips = sa.Table(
    "clips", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("wav", sa.LargeBinary, nullable=False),
    sa.Column("sample_rate", sa.Integer, nullable=False),
    sa.Column("seconds", sa.Float, nullable=False),
)

batches = sa.Table(
    "batches", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("strategy", sa.String(32), nullable=False),
    sa.Column("source", sa.Text, nullable=False),  # where the samples came from (run dir, manifest)
    sa.Column("tags", sa.JSON, nullable=False),  # the reason tags annotators can pick
    sa.Column("instructions", sa.Text, nullable=False),
    sa.Column("votes_per_pair", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False, server_default=NOW),
)

pairs = sa.Table(
    "pairs", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("batch_id", sa.ForeignKey("batches.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("key", sa.String(256), nullable=False),  # stable name within the batch, e.g. "<group>:<i>-<j>"
    sa.Column("text", sa.Text, nullable=False),  # what was asked for (the TTS text, the user turn)
    sa.Column("context", sa.JSON, nullable=False),  # shown with the pair: {"persona": ..., "history": ...}
    sa.Column("voice_clip_id", sa.ForeignKey("clips.id"), nullable=True),  # voice reference to match
    sa.Column("first_clip_id", sa.ForeignKey("clips.id"), nullable=False),
    sa.Column("second_clip_id", sa.ForeignKey("clips.id"), nullable=False),
    sa.Column("first_meta", sa.JSON, nullable=False),  # {"source": "step-30", "reward": 0.41, ...}
    sa.Column("second_meta", sa.JSON, nullable=False),
    sa.UniqueConstraint("batch_id", "key"),
)

assignments = sa.Table(
    "assignments", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("pair_id", sa.ForeignKey("pairs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("annotator_id", sa.ForeignKey("annotators.id"), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),  # order in the annotator's queue
    sa.Column("a_is_first", sa.Boolean, nullable=False),  # the randomized order: is A the pair's first clip?
    sa.Column("created_at", sa.DateTime, nullable=False, server_default=NOW),
    sa.UniqueConstraint("pair_id", "annotator_id"),
    sa.Index("ix_assignments_queue", "annotator_id", "position"),
)

CHOICES = ("A", "B", "tie", "both_bad")  # what the annotator pressed
PREFERENCES = ("first", "second", "tie", "both_bad")  # the same, with the A/B order undone

judgments = sa.Table(
    "judgments", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("assignment_id", sa.ForeignKey("assignments.id", ondelete="CASCADE"), nullable=False),
    sa.Column("submission_id", sa.String(64), nullable=False, unique=True),
    sa.Column("choice", sa.String(8), nullable=False),
    sa.Column("preferred", sa.String(8), nullable=False),
    sa.Column("tags", sa.JSON, nullable=False),
    sa.Column("comment", sa.Text, nullable=False),
    sa.Column("played_a", sa.Boolean, nullable=False),
    sa.Column("played_b", sa.Boolean, nullable=False),
    sa.Column("seconds", sa.Float, nullable=True),  # time on the task, as the browser measured it
    sa.Column("created_at", sa.DateTime, nullable=False, server_default=NOW),
    sa.Column("undone_at", sa.DateTime, nullable=True),
    sa.CheckConstraint(f"choice IN {CHOICES}", name="ck_judgments_choice"),
    sa.CheckConstraint(f"preferred IN {PREFERENCES}", name="ck_judgments_preferred"),
    # at most one live judgment per assignment: two racing submissions cannot both land
    sa.Index("uq_judgments_live", "assignment_id", unique=True,
             sqlite_where=sa.text("undone_at IS NULL"), postgresql_where=sa.text("undone_at IS NULL")),
)


def default_url() -> str:
    """$SPEECHRL_ANNOTATION_DB, else annotations.db (SQLite) in the current folder."""
    return os.environ.get(DEFAULT_URL_ENV) or "sqlite:///annotations.db"


def normalize_url(url: str | Path) -> str:
    """Accept a bare file path for SQLite and plain postgresql:// URLs (psycopg 3 is our driver)."""
    url = str(url)
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().absolute()}"
    if re.match(r"postgres(ql)?://", url):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str | Path | None = None, **kwargs) -> Engine:
    """An engine for `url` (see normalize_url); SQLite gets WAL, foreign keys and a busy timeout."""
    url = normalize_url(url or default_url())
    if url.startswith("sqlite"):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)
        _sqlite_pragmas(engine)
        return engine
    return sa.create_engine(url, pool_pre_ping=True, **kwargs)


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_conn, _):
        # Let SQLAlchemy, not the sqlite3 module, open transactions (see "begin" below).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives a crash of the app
        cur.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn):
        # BEGIN IMMEDIATE takes the write lock up front. With sqlite3's deferred BEGIN, two
        # transactions that both read and then write can deadlock, and SQLite then fails one
        # at once ("database is locked") instead of waiting out busy_timeout.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def migrate(engine: Engine, revision: str = "head") -> str:
    """Upgrade the schema to `revision` with Alembic; returns the revision the database is at."""
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)  # on import it logs each of its plugins at INFO
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def open_db(url: str | Path | None = None, **kwargs) -> Engine:
    """An engine on an up-to-date database (created if it does not exist)."""
    engine = make_engine(url, **kwargs)
    migrate(engine)
    return engine
