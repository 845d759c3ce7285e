"""The web app's HTTP surface on both engines: every route checks the annotator, audio comes only
from the store by task id, malformed requests get a 4xx naming the field and change nothing."""
from __future__ import annotations

import io
import uuid

import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from annotation_test_utils import make_batch
from speechrl.data.annotation import store
from speechrl.data.annotation.app import COOKIE, create_app
from speechrl.data.annotation.db import open_db


@pytest.fixture
def setup(db_url):
    engine = open_db(db_url)
    tokens, _ = make_batch(engine, ["alice", "bob", "root"], n_pairs=4, votes=2, admin=("root",), voice=True)
    client = TestClient(create_app(engine))
    yield engine, client, tokens
    client.close()
    engine.dispose()


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def answer(client, token, task_id, choice="A", **extra):
    body = {"assignment_id": task_id, "submission_id": uuid.uuid4().hex, "choice": choice, **extra}
    return client.post("/api/judgments", json=body, headers=auth(token))


def test_every_api_route_but_sign_in_needs_a_valid_token(setup):
    _, client, tokens = setup
    routes = [(m, r.path) for r in client.app.routes if r.path.startswith("/api/") and r.path != "/api/session"
              for m in r.methods]
    assert len(routes) >= 6
    for method, path in routes:
        url = path.replace("{assignment_id}", "1").replace("{slot}", "a")
        for headers in ({}, auth("not-a-token"), {"Cookie": f"{COOKIE}=forged"}):
            res = client.request(method, url, headers=headers, json={})
            assert res.status_code == 401, (method, url, headers, res.text)
            assert "sign in" in res.json()["error"]
    assert client.get("/api/admin/stats", headers=auth(tokens["alice"])).status_code == 403
    stats = client.get("/api/admin/stats", headers=auth(tokens["root"]))
    assert stats.status_code == 200 and {a["annotator"] for a in stats.json()["annotators"]} == {"alice", "bob", "root"}


def test_sign_in_sets_a_cookie_session(setup):
    _, client, tokens = setup
    assert client.post("/api/session", json={"token": "wrong"}).status_code == 401
    res = client.post("/api/session", json={"token": tokens["alice"]})
    assert res.status_code == 200 and res.json()["name"] == "alice"
    assert "httponly" in res.headers["set-cookie"].lower() and "samesite=strict" in res.headers["set-cookie"].lower()
    assert client.get("/api/me").json()["progress"]["total"] > 0  # the cookie alone signs the next request in
    client.delete("/api/session")
    assert client.get("/api/me").status_code == 401


def test_annotating_through_the_api(setup):
    engine, client, tokens = setup
    tok = tokens["alice"]
    nxt = client.get("/api/next", headers=auth(tok)).json()
    task, total = nxt["task"], nxt["progress"]["total"]
    assert task["text"].startswith("sentence number") and task["has_voice"] and task["tags"]
    for slot in ("a", "b", "voice"):
        res = client.get(task["audio"][slot], headers=auth(tok))
        assert res.status_code == 200 and res.headers["content-type"] == "audio/wav"
        data, rate = sf.read(io.BytesIO(res.content))
        assert rate == 16000 and len(data) > 1000
    assert client.get(task["audio"]["a"], headers=auth(tok)).content != client.get(task["audio"]["b"],
                                                                                     headers=auth(tok)).content
    body = {"assignment_id": task["id"], "submission_id": uuid.uuid4().hex, "choice": "B",
            "tags": ["naturalness"], "comment": "smoother", "played_a": True, "played_b": True, "seconds": 4.2}
    first = client.post("/api/judgments", json=body, headers=auth(tok))
    assert first.status_code == 201 and first.json()["progress"]["done"] == 1
    retry = client.post("/api/judgments", json=body, headers=auth(tok))
    assert retry.status_code == 200 and retry.json()["judgment_id"] == first.json()["judgment_id"]
    assert answer(client, tok, task["id"], "A").status_code == 409
    undone = client.post("/api/undo", headers=auth(tok)).json()
    assert undone["reopened"] == task["id"] and undone["task"]["id"] == task["id"]
    while (t := client.get("/api/next", headers=auth(tok)).json()["task"]) is not None:
        assert answer(client, tok, t["id"], "tie").status_code == 201
    assert client.get("/api/me", headers=auth(tok)).json()["progress"] == {"done": total, "total": total}
    live = store.live_judgments(engine)
    assert len(live) == total and {j["annotator"] for j in live} == {"alice"}


def test_no_one_reaches_another_annotators_task_or_any_path(setup):
    _, client, tokens = setup
    bobs = client.get("/api/next", headers=auth(tokens["bob"])).json()["task"]
    for url in (f"/api/audio/{bobs['id']}/a", f"/api/audio/{bobs['id']}/voice"):
        res = client.get(url, headers=auth(tokens["alice"]))
        assert res.status_code == 404 and "no task" in res.json()["error"]
    assert answer(client, tokens["alice"], bobs["id"]).status_code == 404
    for url in (f"/api/audio/{bobs['id']}/..%2F..%2Fetc%2Fpasswd", "/api/audio/..%2F..%2Fetc/passwd",
                f"/api/audio/{bobs['id']}/%2Fetc%2Fpasswd", "/static/../../../etc/passwd", "/api/audio/-1/a",
                f"/api/audio/{bobs['id']}/A"):
        res = client.get(url, headers=auth(tokens["bob"]))
        assert res.status_code in (404, 422), url
        assert b"root:" not in res.content


@pytest.mark.parametrize("body, field", [
    ({"choice": "C"}, "choice"),
    ({"choice": None}, "choice"),
    ({"assignment_id": "one"}, "assignment_id"),
    ({"submission_id": "x"}, "submission_id"),
    ({"tags": "naturalness"}, "tags"),
    ({"tags": ["no such tag"]}, "unknown tags"),
    ({"comment": "x" * 3000}, "comment"),
    ({"seconds": -3}, "seconds"),
    ({"sneaky": 1}, "sneaky"),
])
def test_malformed_submissions_get_a_4xx_naming_the_field_and_change_nothing(setup, body, field):
    engine, client, tokens = setup
    task = client.get("/api/next", headers=auth(tokens["alice"])).json()["task"]
    full = {"assignment_id": task["id"], "submission_id": uuid.uuid4().hex, "choice": "A", **body}
    res = client.post("/api/judgments", json=full, headers=auth(tokens["alice"]))
    assert 400 <= res.status_code < 500 and field in res.json()["error"], res.text
    assert store.live_judgments(engine) == []
    raw = client.post("/api/judgments", content=b"{not json", headers={**auth(tokens["alice"]),
                                                                        "Content-Type": "application/json"})
    assert raw.status_code == 422 and store.live_judgments(engine) == []


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_database_outage_is_a_503_and_the_answer_sent_again_is_stored_once(db_url, postgres_server):
    """The PostgreSQL server under the app is aborted as a crash would: every call is a 503 saying
    the answer is not saved yet (never a bare 500), and once the server is back the same answer (same
    submission_id, as the page sends it again) is stored exactly once."""
    engine = open_db(db_url)
    tokens, _ = make_batch(engine, ["alice"], n_pairs=2, votes=1)
    client, alice = TestClient(create_app(engine)), auth(tokens["alice"])
    try:
        task = client.get("/api/next", headers=alice).json()["task"]
        body = {"assignment_id": task["id"], "submission_id": uuid.uuid4().hex, "choice": "A"}
        with engine.connect() as conn:  # the test server commits asynchronously (no fsync): make the batch durable
            conn.exec_driver_sql("CHECKPOINT")
        postgres_server.stop()
        try:
            for res in (client.post("/api/judgments", json=body, headers=alice), client.get("/api/next", headers=alice)):
                assert res.status_code == 503, res.text
                assert "cannot be reached" in res.json()["error"] and res.headers["retry-after"] == "2"
        finally:
            assert postgres_server.start().returncode == 0
        assert client.post("/api/judgments", json=body, headers=alice).status_code == 201
        assert client.post("/api/judgments", json=body, headers=alice).status_code == 200  # a retry: stored once
        assert [j["choice"] for j in store.live_judgments(engine)] == ["A"]
        assert client.get("/api/next", headers=alice).json()["task"]["id"] != task["id"]
    finally:
        client.close()
        engine.dispose()
