"""Errors as typed HTTP responses: every error is ``{"error": kind, "detail": one line}``.

mukv's own errors map to 4xx (bad input, a missing stream, a conflict), never to a bare 500;
an unexpected exception is a 500 that still names itself.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError, EmptyMemoryError, InputError, MukvError, RetrievalError, StoreError
from .adapter import NotSupported, describe

log = logging.getLogger(__name__)


class NotFound(MukvError):
    """No such stream, frame or route (404)."""


class Conflict(MukvError):
    """The request conflicts with the stream's state: it exists already, another server writes it (409)."""


class TooLarge(MukvError):
    """A body, an image or a frame beyond the server's limits (413)."""


class Unavailable(MukvError):
    """The server is starting or stopping (503)."""


class Unauthorized(MukvError):
    """A missing or wrong bearer token (401)."""


#: status code of each error class; the first match in order wins
STATUS: list[tuple[type[BaseException], int]] = [
    (Unauthorized, 401), (NotFound, 404), (Conflict, 409), (TooLarge, 413), (Unavailable, 503), (NotSupported, 501),
    (EmptyMemoryError, 409), (RetrievalError, 422), (InputError, 422), (ConfigError, 422), (StoreError, 409),
    (MukvError, 400),
]


def status_of(exc: BaseException) -> int:
    for cls, code in STATUS:
        if isinstance(exc, cls):
            return code
    return 500


def error_body(exc: BaseException) -> dict[str, str]:
    return {"error": type(exc).__name__, "detail": describe(exc)}


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:8]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",)) or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into ``ErrorBody`` JSON."""

    @app.exception_handler(MukvError)
    async def _mukv(request: Request, exc: MukvError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        return JSONResponse(error_body(exc), status_code=status_of(exc), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": "InputError", "detail": _validation_detail(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        return JSONResponse({"error": kind, "detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return JSONResponse({"error": type(exc).__name__, "detail": f"internal error: {describe(exc)}"},
                            status_code=500)
