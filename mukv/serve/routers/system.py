"""``/healthz`` and ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from ..auth import require_token
from ..deps import get_engine
from ..engine import Engine
from ..protocol import Health

router = APIRouter(tags=["system"])

PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/healthz", response_model=Health, summary="Liveness (no token needed)")
async def healthz(engine: Engine = Depends(get_engine)) -> dict:
    return engine.health()


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(require_token)],
            summary="Metrics in the Prometheus text format")
async def metrics(engine: Engine = Depends(get_engine)) -> PlainTextResponse:
    return PlainTextResponse(engine.metrics.render(), media_type=PROMETHEUS)
