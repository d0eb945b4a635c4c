"""The ASGI application: ``create_app(config)`` builds it around one :class:`~mukv.serve.engine.Engine`."""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles

from .. import __version__
from . import errors
from .auth import BodyLimit, require_token
from .config import ServeConfig
from .engine import Engine
from .routers import ask, frames, page, streams, system
from .routers.page import STATIC

DESCRIPTION = """A memory service for live video streams: push frames (or let the server pull a
file, folder or camera), ask questions about what happened, see the retrieved moments. Every error
is `{"error": kind, "detail": message}`."""


def create_app(config: ServeConfig, model: Any = None, engine: Engine | None = None) -> FastAPI:
    """The application: routers, error handlers, body limit, and the engine started and stopped
    with the application's lifespan.

    Args:
        config: what to serve.
        model: a loaded model adapter to share (default: the engine loads one).
        engine: an engine built (and perhaps loaded) already.
    """
    engine = engine if engine is not None else Engine(config, model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await anyio.to_thread.run_sync(engine.start)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(engine.stop)
            print(f"mukv serve: stopped; {engine.summary()}", file=sys.stderr, flush=True)

    app = FastAPI(title="mukv serve", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.engine = engine
    errors.install(app)
    auth = [Depends(require_token)]
    app.include_router(streams.router, dependencies=auth)
    app.include_router(frames.router, dependencies=auth)
    app.include_router(ask.router, dependencies=auth)
    app.include_router(system.router)
    app.include_router(page.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, max_bytes=config.max_upload_bytes)
    return app
