"""The annotation web app: sign in, hear A and B, answer, next.

Every /api route but sign-in resolves the annotator from their token (cookie or Bearer header) and
touches only their assignments; audio is served by assignment id from the database, never by path.
The pages are two static files with no build step and nothing fetched, so the app works air-gapped.
"""
from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Engine
from sqlalchemy.exc import InterfaceError, OperationalError

from speechrl.data.annotation import store
from speechrl.data.annotation.store import AnnotationError, Submission

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
COOKIE = "speechrl_annotator"


class SignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(min_length=1, max_length=256)


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    assignment_id: int = Field(ge=1)
    submission_id: str = Field(min_length=8, max_length=64)
    choice: str = Field(pattern="^(A|B|tie|both_bad)$")
    tags: list[str] = Field(default_factory=list, max_length=store.MAX_TAGS)
    comment: str = Field(default="", max_length=store.MAX_COMMENT_CHARS)
    played_a: bool = False
    played_b: bool = False
    seconds: Optional[float] = Field(default=None, ge=0, lt=86400)


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="speechrl annotation", docs_url=None, redoc_url=None)

    @app.exception_handler(AnnotationError)
    async def _refused(_: Request, e: AnnotationError):
        return JSONResponse({"error": e.message}, status_code=e.status)

    async def _database_down(_: Request, e: Exception):
        # the server restarting, a lost connection, a locked SQLite file: nothing was stored, and the
        # same request (same submission_id) can be sent again; the page does so by itself
        log.warning("annotation database unreachable: %s", getattr(e, "orig", None) or e)
        return JSONResponse({"error": "the annotation database cannot be reached just now, so this answer is not "
                                      "saved yet; it is sent again in a moment (tell the admin if this goes on)"},
                            status_code=503, headers={"Retry-After": "2"})

    for unreachable in (OperationalError, InterfaceError):
        app.add_exception_handler(unreachable, _database_down)

    @app.exception_handler(RequestValidationError)
    async def _malformed(_: Request, e: RequestValidationError):
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"field {where!r}: {err.get('msg')}")
        return JSONResponse({"error": "; ".join(problems) or "malformed request"}, status_code=422)

    def annotator(request: Request) -> dict:
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(COOKIE, "")
        who = store.annotator_for_token(engine, token)
        if who is None:
            raise _Unauthorized("sign in first: your token is missing, wrong, or was replaced by an admin")
        return who

    def admin(who: dict = Depends(annotator)) -> dict:
        if not who["is_admin"]:
            raise _Forbidden("admins only")
        return who

    # --- pages --------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers=_NO_STORE)

    @app.get("/admin", include_in_schema=False)
    def admin_page():
        return FileResponse(STATIC / "admin.html", headers=_NO_STORE)

    # --- sign in ------------------------------------------------------------------------------
    @app.post("/api/session")
    def sign_in(body: SignIn):
        who = store.annotator_for_token(engine, body.token)
        if who is None:
            raise _Unauthorized("unknown token: ask your admin for yours (`speechrl annotate add-annotator`)")
        response = JSONResponse({"name": who["name"], "is_admin": who["is_admin"]})
        response.set_cookie(COOKIE, body.token, httponly=True, samesite="strict", max_age=30 * 86400)
        return response

    @app.delete("/api/session")
    def sign_out():
        response = JSONResponse({"signed_out": True})
        response.delete_cookie(COOKIE)
        return response

    @app.get("/api/me")
    def me(who: dict = Depends(annotator)):
        with engine.connect() as conn:
            return {"name": who["name"], "is_admin": who["is_admin"], "progress": store.progress(conn, who["id"])}

    # --- annotating ---------------------------------------------------------------------------
    @app.get("/api/next")
    def next_task(who: dict = Depends(annotator)):
        return store.next_task(engine, who["id"])

    @app.get("/api/audio/{assignment_id}/{slot}")
    def audio(assignment_id: int, slot: str, who: dict = Depends(annotator)):
        data = store.task_audio(engine, who["id"], assignment_id, slot)
        return Response(data, media_type="audio/wav", headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/api/judgments")
    def answer(body: Answer, who: dict = Depends(annotator)):
        stored, created = store.submit(engine, who["id"], Submission(**body.model_dump()))
        with engine.connect() as conn:
            prog = store.progress(conn, who["id"])
        return JSONResponse({"judgment_id": stored["id"], "created": created, "progress": prog},
                            status_code=201 if created else 200)

    @app.post("/api/undo")
    def undo(who: dict = Depends(annotator)):
        assignment_id = store.undo_last(engine, who["id"])
        return {"reopened": assignment_id, **store.next_task(engine, who["id"])}

    # --- admins -------------------------------------------------------------------------------
    @app.get("/api/admin/stats")
    def stats(batch: Optional[str] = None, who: dict = Depends(admin)):
        from speechrl.data.annotation.export import summarize

        return summarize(engine, batch=batch)

    return app


_NO_STORE = {"Cache-Control": "no-store"}


class _Unauthorized(AnnotationError):
    status = 401


class _Forbidden(AnnotationError):
    status = 403


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(db_url: Optional[str] = None, host: str = "127.0.0.1", port: int = 8700) -> None:
    """Run the app with uvicorn until interrupted (one process; the database serializes writes)."""
    import uvicorn

    from speechrl.data.annotation.db import open_db

    engine = open_db(db_url)
    if not is_loopback(host):
        log.warning("serving on %s: tokens travel in clear text; put the app behind an HTTPS proxy", host)
    print(f"annotation app on http://{host}:{port}/  (admins: http://{host}:{port}/admin)", flush=True)
    uvicorn.run(create_app(engine), host=host, port=port, log_level="warning")
