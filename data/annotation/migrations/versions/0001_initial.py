"""The first schema: annotators, the clip store, batches, pairs, assignments and judgments.

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

NOW = sa.func.current_timestamp()


def upgrade() -> None:
    op.create_table(
        "annotators",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("is_admin", sa.Boolean, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False, server_default=NOW),
        sa.UniqueConstraint("name", name="uq_annotators_name"),
        sa.UniqueConstraint("token_hash", name="uq_annotators_token_hash"),
    )
    op.create_table(
        "clips",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("wav", sa.LargeBinary, nullable=False),
        sa.Column("sample_rate", sa.Integer, nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.UniqueConstraint("sha256", name="uq_clips_sha256"),
    )
    op.create_table(
        "batches",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("strategy", sa.String(32), nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("instructions", sa.Text, nullable=False),
        sa.Column("votes_per_pair", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False, server_default=NOW),
        sa.UniqueConstraint("name", name="uq_batches_name"),
    )
    op.create_table(
        "pairs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("batch_id", sa.Integer, sa.ForeignKey("batches.id", ondelete="CASCADE",
                                                        name="fk_pairs_batch_id_batches"), nullable=False),
        sa.Column("key", sa.String(256), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("context", sa.JSON, nullable=False),
        sa.Column("voice_clip_id", sa.Integer, sa.ForeignKey("clips.id", name="fk_pairs_voice_clip_id_clips")),
        sa.Column("first_clip_id", sa.Integer, sa.ForeignKey("clips.id", name="fk_pairs_first_clip_id_clips"),
                  nullable=False),
        sa.Column("second_clip_id", sa.Integer, sa.ForeignKey("clips.id", name="fk_pairs_second_clip_id_clips"),
                  nullable=False),
        sa.Column("first_meta", sa.JSON, nullable=False),
        sa.Column("second_meta", sa.JSON, nullable=False),
        sa.UniqueConstraint("batch_id", "key", name="uq_pairs_batch_id"),
    )
    op.create_index("ix_pairs_batch_id", "pairs", ["batch_id"])
    op.create_table(
        "assignments",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("pair_id", sa.Integer, sa.ForeignKey("pairs.id", ondelete="CASCADE",
                                                       name="fk_assignments_pair_id_pairs"), nullable=False),
        sa.Column("annotator_id", sa.Integer, sa.ForeignKey("annotators.id",
                                                            name="fk_assignments_annotator_id_annotators"),
                  nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("a_is_first", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False, server_default=NOW),
        sa.UniqueConstraint("pair_id", "annotator_id", name="uq_assignments_pair_id"),
    )
    op.create_index("ix_assignments_queue", "assignments", ["annotator_id", "position"])
    op.create_table(
        "judgments",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("assignment_id", sa.Integer, sa.ForeignKey("assignments.id", ondelete="CASCADE",
                                                             name="fk_judgments_assignment_id_assignments"),
                  nullable=False),
        sa.Column("submission_id", sa.String(64), nullable=False),
        sa.Column("choice", sa.String(8), nullable=False),
        sa.Column("preferred", sa.String(8), nullable=False),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("comment", sa.Text, nullable=False),
        sa.Column("played_a", sa.Boolean, nullable=False),
        sa.Column("played_b", sa.Boolean, nullable=False),
        sa.Column("seconds", sa.Float),
        sa.Column("created_at", sa.DateTime, nullable=False, server_default=NOW),
        sa.Column("undone_at", sa.DateTime),
        sa.UniqueConstraint("submission_id", name="uq_judgments_submission_id"),
        sa.CheckConstraint("choice IN ('A', 'B', 'tie', 'both_bad')", name="ck_judgments_choice"),
        sa.CheckConstraint("preferred IN ('first', 'second', 'tie', 'both_bad')", name="ck_judgments_preferred"),
    )
    op.create_index("uq_judgments_live", "judgments", ["assignment_id"], unique=True,
                    sqlite_where=sa.text("undone_at IS NULL"), postgresql_where=sa.text("undone_at IS NULL"))


def downgrade() -> None:
    for table in ("judgments", "assignments", "pairs", "batches", "clips", "annotators"):
        op.drop_table(table)
