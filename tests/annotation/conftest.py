"""The annotation app's test services: a throwaway PostgreSQL server, database URLs, a real browser.

Each skips, naming what is missing and how to install it, where its service cannot run; .ci/install
installs Debian's chromium and postgresql where it may. Tests using them are marked `postgres` or
`browser` here, so `-m "not browser"` leaves them out.

The PostgreSQL server is started by hand rather than with pytest-postgresql (10.0): that plugin runs
initdb as the current user, and initdb refuses to run as root, which is how CI and these machines run
the tests. As root we run the server binaries as Debian's `postgres` system user instead.
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from glob import glob
from pathlib import Path

import pytest

# The flags these machines' notes give for headless chromium: no sandbox as root, and no background
# networking, whose connections the closed network refuses, many at a time.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
INSTALL_PG = "install it with: apt-get install -y postgresql (or run .ci/install as root)"


def pytest_collection_modifyitems(items):
    for item in items:
        names = set(item.fixturenames)
        params = getattr(item, "callspec", None) and item.callspec.params
        if names & {"postgres_url", "postgres_server"} or (params and params.get("db_url") == "postgresql"):
            item.add_marker("postgres")
        if names & {"browser", "page"}:
            item.add_marker("browser")


def _pg_bindir() -> Path:
    found = glob("/usr/lib/postgresql/*/bin/initdb")  # Debian's layout: /usr/lib/postgresql/<major>/bin
    if found:  # the newest major version
        return Path(max(found, key=lambda p: int(p.split("/")[4]))).parent
    initdb = shutil.which("initdb")  # other systems put it on PATH
    if initdb:
        return Path(initdb).parent
    pytest.skip(f"PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb, nor initdb on PATH); "
                f"{INSTALL_PG}")


def _run_as() -> dict:
    """subprocess arguments that run the server binaries as a user initdb accepts: ourselves, or
    `postgres` when we are root."""
    if os.geteuid() != 0:
        return {}
    try:
        pg = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root, which initdb refuses, and there is no `postgres` system user "
                    f"to run it as; {INSTALL_PG}")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": pg.pw_dir, "LC_ALL": "C.UTF-8"}
    return {"user": pg.pw_uid, "group": pg.pw_gid, "extra_groups": [], "env": env}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _admin(url: str, statement: str) -> None:
    """Run one statement outside a transaction (CREATE/DROP DATABASE need that)."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


class PostgresServer:
    """The session's PostgreSQL server: `url` of its empty `speechrl` database; `stop()` aborts it as a
    crash would (pg_ctl's immediate mode: no clean shutdown, recovery at the next start) and
    `start()` brings it back on the same port, for the tests of an outage under the app."""

    def __init__(self, bindir: Path, run_as: dict, root: Path):
        self.bindir, self.run_as, self.root = bindir, run_as, root
        self.data, self.log, self.port = root / "data", root / "server.log", 0

    def pg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bindir / args[0]), *args[1:]], capture_output=True, text=True,
                              check=check, timeout=120, **self.run_as)

    def start(self) -> subprocess.CompletedProcess:
        # throwaway data: no fsync; the socket goes in our folder (Debian's /var/run/postgresql may be absent)
        opts = (f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off")
        return self.pg("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log), "-o", opts,
                       check=False)

    def stop(self, mode: str = "immediate") -> None:
        self.pg("pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.data), check=False)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/speechrl"


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server of its own, listening on 127.0.0.1 with trust auth, for this test session;
    stopped and deleted afterwards."""
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install 'psycopg[binary]'")
    bindir, run_as = _pg_bindir(), _run_as()
    # Not under tmp_path: pytest's tmp root is private to the user running pytest (mode 700), which
    # the `postgres` user could not enter.
    root = Path(tempfile.mkdtemp(prefix="speechrl-pg-"))
    if run_as:
        os.chown(root, run_as["user"], run_as["group"])
    server = PostgresServer(bindir, run_as, root)
    try:
        try:
            server.pg("initdb", "-D", str(server.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C",
                      "--no-sync")
        except PermissionError as e:  # e.g. not allowed to switch user inside this container
            pytest.skip(f"cannot run {bindir}/initdb as the postgres user: {e}")
        except subprocess.CalledProcessError as e:
            pytest.skip(f"{bindir}/initdb failed: {e.stderr.strip()[-500:]}")
        for _attempt in range(3):  # another process may take the free port before the server binds it
            server.port = _free_port()
            started = server.start()
            if started.returncode == 0:
                break
        else:
            tail = server.log.read_text()[-800:] if server.log.exists() else started.stderr
            pytest.skip(f"{bindir}/pg_ctl could not start PostgreSQL: {tail}")
        try:
            _admin(server.url.rsplit("/", 1)[0] + "/postgres", "CREATE DATABASE speechrl")
            yield server
        finally:
            server.stop("fast")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_server) -> str:
    """A SQLAlchemy URL (postgresql+psycopg://) of an empty database on the session's server."""
    return postgres_server.url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A SQLAlchemy URL of an empty database: a SQLite file in tmp_path, or a database of its own,
    dropped afterwards, on the session's PostgreSQL server (which skips where it cannot start)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'annotations.db'}"
        return
    server = request.getfixturevalue("postgres_url")
    name = f"test_{uuid.uuid4().hex[:16]}"
    _admin(server, f"CREATE DATABASE {name}")
    try:
        yield server.rsplit("/", 1)[0] + f"/{name}"
    finally:  # FORCE: a test that left a connection open should not keep its database alive
        _admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless, under Playwright's sync API (SPEECHRL_CHROMIUM overrides the path).

    Module scope, not session: Playwright's sync API keeps an asyncio loop running in this thread
    while it is open, and every later test that calls asyncio.run() would fail."""
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed: pip install -e '.[test]'")
    exe = os.environ.get("SPEECHRL_CHROMIUM", "/usr/bin/chromium")
    if not os.access(exe, os.X_OK):
        pytest.skip(f"chromium not found at {exe}: install it with apt-get install -y chromium "
                    "(or run .ci/install as root), or set SPEECHRL_CHROMIUM; `playwright install` downloads fail here")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh page in a context of its own (no cookies or storage shared between tests)."""
    context = browser.new_context()
    try:
        yield context.new_page()
    finally:
        context.close()
