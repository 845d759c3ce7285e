"""The annotation database on both engines: schema from migrations, assignment, exactly-once
answers, undo, and the rules that keep annotators to their own tasks."""
from __future__ import annotations

import threading
import uuid
from collections import Counter

import io

import pytest
import soundfile as sf
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from annotation_test_utils import annotator_id, make_batch, make_specs
from speechrl.data.annotation import store
from speechrl.data.annotation.db import assignments, judgments, metadata, open_db, pairs
from speechrl.data.annotation.batches import Batch, create_batch
from speechrl.data.annotation.store import Submission


@pytest.fixture
def engine(db_url):
    engine = open_db(db_url)
    yield engine
    engine.dispose()


def sid() -> str:
    return uuid.uuid4().hex


def test_migrations_build_exactly_the_declared_schema(engine):
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        assert MigrationContext.configure(conn).get_current_revision() == "0001"
    again = open_db(engine.url.render_as_string(hide_password=False))  # opening again upgrades nothing
    with again.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == "0001"
    again.dispose()


def test_tokens_identify_annotators_and_only_their_hash_is_stored(engine):
    token = store.add_annotator(engine, "alice")
    assert store.annotator_for_token(engine, token)["name"] == "alice"
    assert store.annotator_for_token(engine, token + "x") is None
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT token_hash FROM annotators")).scalar()
    assert token not in stored and stored == store.hash_token(token)
    with pytest.raises(store.Conflict, match="already exists"):
        store.add_annotator(engine, "alice")
    new = store.new_token(engine, "alice")
    assert store.annotator_for_token(engine, token) is None and store.annotator_for_token(engine, new)["name"] == "alice"
    store.deactivate(engine, "alice")
    assert store.annotator_for_token(engine, new) is None


def test_each_pair_goes_to_k_different_annotators_evenly_with_a_recorded_random_order(engine):
    names = ["a1", "a2", "a3", "a4"]
    _, made = make_batch(engine, names, n_pairs=10, votes=2)
    assert made["pairs"] == 10 and made["assignments"] == 20
    assert sorted(made["per_annotator"].values()) == [5, 5, 5, 5]
    with engine.connect() as conn:
        rows = conn.execute(sa.select(assignments)).mappings().all()
    per_pair = Counter(r["pair_id"] for r in rows)
    assert set(per_pair.values()) == {2}
    assert len({(r["pair_id"], r["annotator_id"]) for r in rows}) == 20
    order = Counter(r["a_is_first"] for r in rows)
    assert order[True] > 0 and order[False] > 0  # both orders drawn (p of one-sided < 2e-6)
    with engine.connect() as conn:  # which side is stored first is drawn too (make_specs puts step-30 first)
        firsts = Counter(m["source"] for m in conn.execute(sa.select(pairs.c.first_meta)).scalars())
    assert firsts["step-30"] > 0 and firsts["step-0"] > 0


def test_batches_refuse_what_cannot_be_annotated(engine):
    store.add_annotator(engine, "solo")
    batch = Batch("x", "tts", "test", "tests", ["naturalness"], "", votes_per_pair=2)
    with pytest.raises(store.Invalid, match="2 different annotators, but only 1"):
        create_batch(engine, batch, make_specs(2), ["solo"])
    with pytest.raises(store.NotFound, match="ghost"):
        create_batch(engine, Batch("y", "tts", "t", "t", [], "", 1), make_specs(2), ["solo", "ghost"])
    same = make_specs(1)
    same[0].second = same[0].first
    with pytest.raises(store.Invalid, match="same audio twice"):
        create_batch(engine, Batch("z", "tts", "t", "t", [], "", 1), same, ["solo"])
    with engine.connect() as conn:  # the refused batch left nothing behind
        assert conn.execute(sa.text("SELECT count(*) FROM batches")).scalar() == 0


def test_answers_undo_the_ab_order_and_are_stored_once(engine):
    make_batch(engine, ["alice", "bob"], n_pairs=4, votes=2)
    me = annotator_id(engine, "alice")
    task = store.next_task(engine, me)["task"]
    with engine.connect() as conn:
        a_is_first = conn.execute(sa.select(assignments.c.a_is_first).where(assignments.c.id == task["id"])).scalar()
    # the audio behind A really is the pair's first clip when a_is_first
    wav_a = store.task_audio(engine, me, task["id"], "a")
    data, rate = sf.read(io.BytesIO(wav_a))
    assert rate == 16000 and len(data) == 6400

    sub = Submission(task["id"], sid(), "A", tags=["naturalness"], comment="A is clearer", played_a=True)
    stored, created = store.submit(engine, me, sub)
    assert created and stored["preferred"] == ("first" if a_is_first else "second")
    again, created = store.submit(engine, me, sub)  # a retry of the same submission
    assert not created and again["id"] == stored["id"]
    with pytest.raises(store.Conflict, match="already answered"):
        store.submit(engine, me, Submission(task["id"], sid(), "B"))
    with pytest.raises(store.Conflict, match="already used"):
        store.submit(engine, me, Submission(task["id"], sub.submission_id, "tie"))
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(judgments)).scalar() == 1
    assert store.next_task(engine, me)["task"]["id"] != task["id"]
    assert store.next_task(engine, me)["progress"] == {"done": 1, "total": 4}


def test_undo_reopens_the_last_answer_and_keeps_it_on_record(engine):
    make_batch(engine, ["alice", "bob"], n_pairs=3, votes=2)
    me = annotator_id(engine, "alice")
    first = store.next_task(engine, me)["task"]["id"]
    store.submit(engine, me, Submission(first, sid(), "A"))
    second = store.next_task(engine, me)["task"]["id"]
    store.submit(engine, me, Submission(second, sid(), "tie"))
    assert store.undo_last(engine, me) == second
    assert store.next_task(engine, me)["task"]["id"] == second
    store.submit(engine, me, Submission(second, sid(), "B"))
    with engine.connect() as conn:
        rows = conn.execute(sa.select(judgments.c.choice, judgments.c.undone_at).order_by(judgments.c.id)).all()
    assert [(r.choice, r.undone_at is None) for r in rows] == [("A", True), ("tie", False), ("B", True)]
    assert [j["choice"] for j in store.live_judgments(engine)] == ["A", "B"]
    with pytest.raises(store.Conflict, match="nothing to undo"):
        store.undo_last(engine, annotator_id(engine, "bob"))


def test_annotators_reach_only_their_own_tasks(engine):
    make_batch(engine, ["alice", "bob", "carol"], n_pairs=3, votes=1)
    alice, bob = annotator_id(engine, "alice"), annotator_id(engine, "bob")
    with engine.connect() as conn:
        bobs = conn.execute(sa.select(assignments.c.id).where(assignments.c.annotator_id == bob)).scalars().all()
    assert bobs
    with pytest.raises(store.NotFound):
        store.task_audio(engine, alice, bobs[0], "a")
    with pytest.raises(store.NotFound):
        store.submit(engine, alice, Submission(bobs[0], sid(), "A"))
    with pytest.raises(store.NotFound, match="no audio slot"):
        store.task_audio(engine, bob, bobs[0], "../../etc/passwd")
    with pytest.raises(store.NotFound, match="no voice reference"):
        store.task_audio(engine, bob, bobs[0], "voice")


@pytest.mark.parametrize("bad, match", [
    (dict(choice="C"), "choice"), (dict(submission_id="short"), "submission_id"),
    (dict(tags=["speed"]), "unknown tags"), (dict(tags=["naturalness", "naturalness"]), "distinct"),
    (dict(comment="x" * 5000), "comment"), (dict(seconds=-1.0), "seconds"),
])
def test_malformed_answers_change_nothing(engine, bad, match):
    make_batch(engine, ["alice", "bob"], n_pairs=2, votes=2)
    me = annotator_id(engine, "alice")
    task = store.next_task(engine, me)["task"]
    fields = dict(assignment_id=task["id"], submission_id=sid(), choice="A") | bad
    with pytest.raises(store.Invalid, match=match):
        store.submit(engine, me, Submission(**fields))
    assert store.live_judgments(engine) == []


def test_racing_answers_to_one_task_store_exactly_one(engine):
    """Eight threads answer the same task at once, each twice (a retry): one answer lands, its
    retries see it, the rest are refused as conflicts; nothing is doubled."""
    make_batch(engine, ["alice", "bob"], n_pairs=1, votes=2)
    me = annotator_id(engine, "alice")
    task = store.next_task(engine, me)["task"]["id"]
    start, results = threading.Barrier(8), []

    def racer(k: int):
        sub = Submission(task, f"racer-{k}-" + sid()[:8], "AB"[k % 2])
        start.wait()
        for _ in range(2):
            try:
                results.append(("ok", k, store.submit(engine, me, sub)[1]))
            except store.Conflict:
                results.append(("conflict", k, None))

    threads = [threading.Thread(target=racer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = {k for status, k, _ in results if status == "ok"}
    assert len(winners) == 1
    created = [c for status, _, c in results if status == "ok"]
    assert sorted(created) == [False, True]  # the winner's first try created, its retry found it
    assert len(store.live_judgments(engine)) == 1
