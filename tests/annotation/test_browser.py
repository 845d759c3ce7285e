"""The annotation page in a real browser (Debian's chromium, driven by Playwright): sign in, play A
and B, answer with the keyboard and the mouse, tag, comment, undo; the judgments land in the database.

Set SPEECHRL_SCREENSHOT=docs/annotate.png to refresh the README's screenshot from this test.
"""
from __future__ import annotations

import os
import re

import pytest

from annotation_test_utils import LiveServer, make_batch
from speechrl.data.annotation import store
from speechrl.data.annotation.db import open_db


@pytest.fixture
def served(tmp_path):
    engine = open_db(f"sqlite:///{tmp_path / 'annotations.db'}")
    tokens, _ = make_batch(engine, ["alice"], n_pairs=3, votes=1, voice=True)
    with LiveServer(engine) as server:
        yield engine, server.url, tokens["alice"]
    engine.dispose()


def test_annotator_signs_in_listens_answers_and_undoes(served, page, tmp_path):
    from playwright.sync_api import expect

    engine, url, token = served
    page.goto(url + "/")
    expect(page.locator("#signin")).to_be_visible()
    page.fill("#token", "not-my-token")
    page.click("#signin-button")
    expect(page.locator("#signin-status")).to_contain_text("unknown token")

    page.fill("#token", token)
    page.click("#signin-button")
    expect(page.locator("#task")).to_be_visible()
    expect(page.locator("#who")).to_contain_text("alice")
    expect(page.locator("#count")).to_have_text("0 / 3")
    expect(page.locator("#text")).to_contain_text("sentence number")
    expect(page.locator("#voice-row")).to_be_visible()

    # play A with its key and B with the mouse: the browser really fetches and plays the clips
    page.keyboard.press("q")
    expect(page.locator("#player-a")).to_have_class(re.compile(r"\bplayed\b"), timeout=10_000)
    page.locator("#audio-b").evaluate("a => a.play()")
    expect(page.locator("#player-b")).to_have_class(re.compile(r"\bplayed\b"), timeout=10_000)
    assert page.locator("#audio-a").evaluate("a => a.duration") == pytest.approx(0.4, abs=0.01)

    page.keyboard.press("s")  # the second reason tag, "naturalness"
    expect(page.locator(".tag.on")).to_have_text(re.compile("naturalness"))
    page.fill("#comment", "A sounds smoother")
    if os.environ.get("SPEECHRL_SCREENSHOT"):
        page.set_viewport_size({"width": 1000, "height": 900})
        page.screenshot(path=os.environ["SPEECHRL_SCREENSHOT"], full_page=True)
    first_text = page.locator("#text").inner_text()
    page.locator("body").click(position={"x": 5, "y": 5})  # leave the comment box: keys answer again
    page.keyboard.press("1")
    expect(page.locator("#count")).to_have_text("1 / 3")
    expect(page.locator("#status")).to_contain_text("saved: A")

    [j] = store.live_judgments(engine)
    assert (j["choice"], j["tags"], j["comment"], j["played_a"], j["played_b"]) == (
        "A", ["naturalness"], "A sounds smoother", True, True)
    assert 0 < j["seconds"] < 120

    page.keyboard.press("u")  # undo: the same task comes back, the answer is retracted
    expect(page.locator("#status")).to_contain_text("undone")
    expect(page.locator("#count")).to_have_text("0 / 3")
    assert page.locator("#text").inner_text() == first_text and store.live_judgments(engine) == []
    page.click("button.answer[data-choice=B]")
    expect(page.locator("#count")).to_have_text("1 / 3")
    page.keyboard.press("3")
    expect(page.locator("#count")).to_have_text("2 / 3")
    page.keyboard.press("4")
    expect(page.locator("#done")).to_be_visible()
    assert [j["choice"] for j in store.live_judgments(engine)] == ["B", "tie", "both_bad"]

    page.reload()  # the session cookie survives a reload
    expect(page.locator("#done")).to_be_visible()
    page.screenshot(path=str(tmp_path / "done.png"))
    assert (tmp_path / "done.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_admin_page_shows_throughput_and_agreement(tmp_path, page):
    from playwright.sync_api import expect

    engine = open_db(f"sqlite:///{tmp_path / 'annotations.db'}")
    tokens, _ = make_batch(engine, ["ann", "ben", "boss"], n_pairs=4, votes=2, admin=("boss",))
    for name in ("ann", "ben"):
        who = store.annotator_for_token(engine, tokens[name])
        while (t := store.next_task(engine, who["id"])["task"]) is not None:
            store.submit(engine, who["id"], store.Submission(t["id"], f"{name}-{t['id']:08d}", "A"))
    with LiveServer(engine) as server:
        page.goto(server.url + "/")
        page.fill("#token", tokens["ann"])
        page.click("#signin-button")
        expect(page.locator("#done")).to_be_visible()
        page.goto(server.url + "/admin")
        expect(page.locator("#error")).to_contain_text("admins only")
        page.goto(server.url + "/")
        page.click("#signout")
        page.fill("#token", tokens["boss"])
        page.click("#signin-button")
        page.goto(server.url + "/admin")
        expect(page.locator("#people tbody tr")).to_have_count(3)
        expect(page.locator("#tiles")).to_contain_text("Fleiss")
        expect(page.locator("#people")).to_contain_text("ann")
    engine.dispose()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_an_answer_given_while_the_database_is_down_is_saved_once_it_is_back(db_url, postgres_server, page):
    """The PostgreSQL server under the app is aborted; the annotator answers anyway. The page says the
    answer is not saved yet and keeps sending it (same submission_id) until the server is back."""
    import time

    from playwright.sync_api import expect

    engine = open_db(db_url)
    tokens, _ = make_batch(engine, ["alice"], n_pairs=2, votes=1)
    with LiveServer(engine) as server:
        page.goto(server.url + "/")
        page.fill("#token", tokens["alice"])
        page.click("#signin-button")
        expect(page.locator("#count")).to_have_text("0 / 2")
        with engine.connect() as conn:  # the test server commits asynchronously (no fsync): make the batch durable
            conn.exec_driver_sql("CHECKPOINT")
        postgres_server.stop()
        try:
            page.keyboard.press("1")
            expect(page.locator("#status")).to_contain_text("not saved yet, trying again", timeout=10_000)
            time.sleep(2)  # a few retries meet the outage
        finally:
            assert postgres_server.start().returncode == 0
        expect(page.locator("#status")).to_contain_text("saved: A", timeout=30_000)
        expect(page.locator("#count")).to_have_text("1 / 2")
    assert [j["choice"] for j in store.live_judgments(engine)] == ["A"]
    engine.dispose()
