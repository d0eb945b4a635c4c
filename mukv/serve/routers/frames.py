"""``/v1/streams/{id}/frames``: push frames; thumbnails of stored frames."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ...errors import InputError
from .. import media
from ..deps import get_engine
from ..engine import Engine
from ..errors import TooLarge
from ..protocol import ErrorBody, PushResult

ERRORS = {c: {"model": ErrorBody} for c in (401, 404, 409, 413, 422, 503)}
router = APIRouter(prefix="/v1/streams/{stream_id}/frames", tags=["frames"], responses=ERRORS)

NPY_TYPES = ("application/x-npy", "application/npy", "application/octet-stream")
PUSH_DOC = """Push frames: `multipart/form-data` with one or more `frame` parts (JPEG or PNG images, or
`.npy` arrays of `uint8 [n, H, W, 3]`) and an optional `timestamps` part (a JSON array of stream
seconds); or a raw `.npy` body (`Content-Type: application/x-npy`) with optional
`?timestamps=0,2,4`. Frames are queued and ingested in the background; the reply says how many
were queued."""


@router.post("", response_model=PushResult, summary="Push frames (images or .npy)", description=PUSH_DOC)
async def push_frames(stream_id: str, request: Request, engine: Engine = Depends(get_engine)) -> dict:
    engine.get(stream_id)  # 404 / 422 before reading the body
    cfg = engine.config
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form(max_files=cfg.max_frames_per_push, max_fields=16, max_part_size=1 << 20)
        try:
            parts, stamps = [], form.get("timestamps")
            for key, value in form.multi_items():
                if key != "frame":
                    if key != "timestamps":
                        raise InputError(f"unknown form field {key!r}: send 'frame' parts and an optional 'timestamps'")
                    continue
                if not isinstance(value, UploadFile):
                    raise InputError("'frame' must be a file part (an image or an .npy array)")
                parts.append((value.filename or "", await value.read()))
            if isinstance(stamps, UploadFile):
                stamps = (await stamps.read()).decode("utf-8", errors="replace")
        finally:
            await form.close()
        frames = await run_in_threadpool(media.frames_from_parts, parts, cfg.max_frame_pixels,
                                         cfg.max_frames_per_push)
    elif ctype in NPY_TYPES:
        data = await request.body()
        stamps = request.query_params.get("timestamps")
        frames = await run_in_threadpool(media.decode_npy, data, cfg.max_frame_pixels, cfg.max_frames_per_push,
                                         "body")
    else:
        raise InputError(f"Content-Type {ctype or '(none)'!r}: send multipart/form-data (images or .npy parts) "
                         "or application/x-npy")
    times = media.parse_timestamps(stamps)
    if times is not None and times.size != frames.shape[0]:
        raise InputError(f"got {times.size} timestamps for {frames.shape[0]} frames")
    return engine.push(stream_id, frames, times)


@router.get("/{index}.jpg", response_class=Response, summary="JPEG thumbnail of a stored frame",
            responses={200: {"content": {"image/jpeg": {}}}})
async def thumbnail(stream_id: str, index: int, engine: Engine = Depends(get_engine)) -> Response:
    if not -(1 << 62) < index < (1 << 62):
        raise TooLarge(f"frame index {index} is out of range")
    data = await run_in_threadpool(engine.thumbnail, stream_id, index)
    return Response(content=data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})
