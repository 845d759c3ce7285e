"""The annotation test services themselves: databases that answer and isolate, a browser that runs JS."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sqlalchemy as sa

CLICK_PAGE = b"""<!doctype html><html><body>
<button id="go" onclick="document.getElementById('out').textContent = 'clicked ' + (++n)">go</button>
<p id="out">not yet</p>
<script>let n = 0;</script>
</body></html>"""


def test_db_answers_and_connections_see_committed_rows(db_url):
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as writer, engine.connect() as reader:
            assert reader.execute(sa.text("SELECT 1")).scalar() == 1
            writer.execute(sa.text("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"))
            writer.execute(sa.text("INSERT INTO notes (id, body) VALUES (1, 'from the writer')"))
            writer.commit()
            assert reader.execute(sa.text("SELECT body FROM notes")).scalars().all() == ["from the writer"]
            reader.execute(sa.text("INSERT INTO notes (id, body) VALUES (2, 'from the reader')"))
            reader.commit()
            assert writer.execute(sa.text("SELECT count(*) FROM notes")).scalar() == 2
    finally:
        engine.dispose()


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_gets_an_empty_database(db_url, run):
    # the same table in two runs: the second would fail were the database shared
    engine = sa.create_engine(db_url)
    try:
        assert sa.inspect(engine).get_table_names() == []
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE isolated (id INTEGER)"))
    finally:
        engine.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sqlite_url_takes_wal(db_url):
    assert db_url.startswith("sqlite:///") and db_url.endswith("/annotations.db")
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode=wal").scalar() == "wal"
    finally:
        engine.dispose()


def test_postgres_url_is_postgres(postgres_url):
    assert postgres_url.startswith("postgresql+psycopg://")
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version()")).scalar().startswith("PostgreSQL")
    finally:
        engine.dispose()


@pytest.fixture
def click_page_url():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.end_headers()
            self.wfile.write(CLICK_PAGE)

        def log_message(self, *args):  # keep the test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_browser_clicks_a_button_and_js_runs(page, click_page_url):
    from playwright.sync_api import expect

    page.goto(click_page_url)
    expect(page.locator("#out")).to_have_text("not yet")
    page.click("#go")
    page.click("#go")
    expect(page.locator("#out")).to_have_text("clicked 2")
