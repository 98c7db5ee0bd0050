"""The app factory: `create_app(state)` builds the FastAPI app around a ServerState passed in.

No module-level state: the security gate, JSON errors of one line, the native and A1111 routes,
the web page at / (static/web/: plain HTML, CSS and JS on the native API) and an OpenAPI page,
whose assets the server serves itself (static/: no CDN, works offline)."""
from __future__ import annotations

import dataclasses
import datetime
import re
import traceback
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import UserError, one_line
from ..fsutil import atomic_write_text
from . import api_a1111, api_jobs, api_library
from .errors import status_of
from .security import Guard

STATIC = Path(__file__).parent / "static"
WEB = STATIC / "web"          # the page at /: its files are the only ones served without the token


_FIELD = re.compile(r"^(?:--([a-z][a-z0-9-]*)|config: ([a-z_][a-z0-9_]*)|([a-z_][a-z0-9_]*) [\'\"])")
# messages that name their setting in words rather than by its key
_PHRASES = (("learning rate schedule", "lr"), ("clip threshold schedule", "clip_grad"), ("embedding name ", "name"),
            ("hypernetwork name ", "name"))


def error_response(status: int, message: str, headers=None, field: bool = False) -> JSONResponse:
    """{"error", "detail"} (the same line), and for a refused setting `field`: the TrainConfig key
    it names (a form shows the line beside that field)."""
    msg = one_line(message)
    body = {"error": msg, "detail": msg}
    m = _FIELD.match(msg) if field else None
    key = next(g for g in m.groups() if g).replace("-", "_") if m else None
    if field and key is None:
        key = next((k for phrase, k in _PHRASES if msg.startswith(phrase)), None)
    if key is not None:
        from ..training.config import FIELDS, config_class
        if key in FIELDS or key in {f.name for f in dataclasses.fields(config_class("hypernetwork"))}:
            body["field"] = key
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(state) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        import asyncio
        await asyncio.to_thread(state.stop, state.settings.shutdown_s)   # the runs save; the store closes

    app = FastAPI(title="ti-fast serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json",
                  description="Textual-inversion training and txt2img on one loaded model. Native API under "
                              "/api/v1, A1111-compatible routes under /sdapi/v1.")
    app.state.ti = state
    s = state.settings
    public = {"/"} | {f"/static/web/{p.name}" for p in WEB.iterdir() if p.is_file()}
    app.add_middleware(Guard, token=s.token, body_limit=s.max_body_mb << 20,
                       upload_limit=(s.max_upload_mb << 20) + (1 << 20), upload_prefix="/api/v1/datasets/",
                       public=frozenset(public))

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError):
        return error_response(status_of(e), state.home.public(str(e)), field=True)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return error_response(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return error_response(422, f"{where}: {first.get('msg', 'invalid request')}" + (
            f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""))

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = state.home.dir("logs") / f"server-traceback-{stamp}.txt"
        try:
            atomic_write_text(path, "".join(traceback.format_exception(e)))
            where = f" (traceback in {state.home.relative(path)})"
        except OSError:
            where = ""
        return error_response(500, state.home.public(f"internal error: {type(e).__name__}: {e}{where}"))

    app.include_router(api_library.router(state))
    app.include_router(api_jobs.router(state))
    app.include_router(api_a1111.router(state))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return FileResponse(STATIC / "docs.html", media_type="text/html")

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(WEB / "index.html", media_type="text/html")

    return app
