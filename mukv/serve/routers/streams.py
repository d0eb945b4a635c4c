"""``/v1/streams``: list, create, look at and delete streams."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, status
from fastapi.concurrency import run_in_threadpool

from ..deps import get_engine
from ..engine import Engine
from ..protocol import ErrorBody, StreamCreate, StreamList, StreamStatus

ERRORS = {c: {"model": ErrorBody} for c in (401, 404, 409, 422, 503)}
router = APIRouter(prefix="/v1/streams", tags=["streams"], responses=ERRORS)


@router.get("", response_model=StreamList, summary="The store's streams with their live status")
async def list_streams(engine: Engine = Depends(get_engine)) -> dict:
    return {"streams": engine.statuses()}


@router.post("", response_model=StreamStatus, status_code=status.HTTP_201_CREATED,
             summary="Create a stream (optionally pulling a file, folder or camera/URL)")
async def create_stream(body: StreamCreate, engine: Engine = Depends(get_engine)) -> dict:
    engine.check_new(body.id)
    source = None
    if body.source is not None:  # opened here: a camera may take its timeout, the engine goes on
        source = await run_in_threadpool(engine.open_source, body.source.model_dump(), body.fps)
    try:
        return await asyncio.wrap_future(engine.call(lambda: engine.create(body.id, fps=body.fps, source=source)))
    except BaseException:
        if source is not None:
            close = getattr(source["source"], "close", None)
            if callable(close):
                close()
        raise


@router.get("/{stream_id}", response_model=StreamStatus, summary="A stream's status")
async def get_stream(stream_id: str, engine: Engine = Depends(get_engine)) -> dict:
    return engine.get(stream_id).status()


@router.delete("/{stream_id}", status_code=status.HTTP_204_NO_CONTENT,
               summary="Stop a stream and delete it from the store")
async def delete_stream(stream_id: str, engine: Engine = Depends(get_engine)) -> None:
    engine.get(stream_id)  # 404 / 422 at once
    await asyncio.wrap_future(engine.call(lambda: engine.close_for_delete(stream_id)))
    await run_in_threadpool(engine.delete, stream_id)
