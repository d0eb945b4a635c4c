"""Dependencies shared by the routers."""

from __future__ import annotations

from fastapi import Request

from .engine import Engine


def get_engine(request: Request) -> Engine:
    """The application's engine."""
    return request.app.state.engine
