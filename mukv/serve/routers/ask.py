"""``/v1/streams/{id}/ask``: a question, answered as JSON or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse

from ..deps import get_engine
from ..engine import Engine
from ..errors import error_body, status_of
from ..protocol import AnswerBody, AskRequest, ErrorBody

ERRORS = {c: {"model": ErrorBody} for c in (401, 404, 409, 422, 501, 503)}
router = APIRouter(prefix="/v1/streams/{stream_id}/ask", tags=["questions"], responses=ERRORS)


class _Gone(Exception):
    """The client went away: the question stops at its next token."""


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@router.post("", response_model=AnswerBody, summary="Ask a question about a stream",
             responses={200: {"content": {"application/json": {}, "text/event-stream": {}}}})
async def ask(stream_id: str, body: AskRequest, engine: Engine = Depends(get_engine)):
    kwargs = dict(since=body.since, until=body.until, max_new_tokens=body.max_new_tokens, top_k=body.top_k)
    if not body.stream:
        fut = engine.submit_ask(stream_id, body.question, **kwargs)
        return await asyncio.wrap_future(fut)

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    gone = False

    def on_token(piece: str) -> None:  # engine thread
        if gone:
            raise _Gone()
        loop.call_soon_threadsafe(events.put_nowait, ("token", piece))

    fut = engine.submit_ask(stream_id, body.question, on_token=on_token, **kwargs)
    fut.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, ("done", f)))
    first = await events.get()
    if first[0] == "done" and first[1].exception() is not None:  # refused before any token: a plain error
        exc = first[1].exception()
        return JSONResponse(error_body(exc), status_code=status_of(exc))

    async def stream() -> AsyncIterator[bytes]:
        nonlocal gone
        item = first
        try:
            while True:
                kind, value = item
                if kind == "token":
                    yield sse("token", {"text": value})
                else:
                    exc = value.exception()
                    if exc is None:
                        yield sse("answer", value.result())
                    else:
                        yield sse("error", error_body(exc))
                    return
                item = await events.get()
        finally:
            gone = True

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
