"""``mukv.Client``: the HTTP API of ``mukv serve`` from Python (httpx).

    import mukv
    c = mukv.Client("http://127.0.0.1:8000", token=None)
    c.create_stream("cam1")
    c.push("cam1", frames)                          # uint8 [n, H, W, 3], or image files / bytes
    for piece in c.ask_stream("cam1", "what color was the car?"):
        print(piece, end="")
    answer = c.ask("cam1", "what color was the car?")   # a dict: text, blocks, timings, ...

Every error the server answers becomes a :class:`~mukv.errors.MukvError` of the server's kind
(``InputError``, ``StoreError``, ...), or :class:`ServerError` carrying the status code.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from . import errors as _errors
from .errors import InputError, MukvError


class ServerError(MukvError):
    """An error answered by the server that is not one of mukv's own classes.

    Attributes:
        status: the HTTP status code (``None`` for an error event of a streamed answer).
        kind: the server's error kind (``NotFound``, ``Conflict``, ``InputError``, ...).
    """

    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(f"{status} {kind}: {detail}")
        self.status, self.kind, self.detail = status, kind, detail


class Client:
    """A client of one ``mukv serve`` server.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        token: the bearer token, if the server needs one.
        timeout: seconds to wait for a reply.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0):
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    # ------------------------------------------------------------------ plumbing
    def _check(self, r: Any) -> Any:
        if r.status_code < 400:
            return r
        try:
            body = r.json()
            kind, detail = body.get("error", "HTTPError"), body.get("detail", r.text)
        except (ValueError, AttributeError):
            kind, detail = "HTTPError", r.text[:500]
        raise _error(r.status_code, kind, detail)

    def _get(self, path: str, **kw: Any) -> Any:
        import httpx

        try:
            return self._check(self._http.get(path, **kw))
        except (httpx.ReadError, httpx.RemoteProtocolError):
            # a kept-alive connection the server closed as the request went out (uvicorn closes idle ones
            # after 5 s): a GET changes nothing, so it is sent once more, on a new connection
            return self._check(self._http.get(path, **kw))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ streams
    def health(self) -> dict[str, Any]:
        """``GET /healthz``."""
        return self._get("/healthz").json()

    def streams(self) -> list[dict[str, Any]]:
        """``GET /v1/streams``: every stream with its status."""
        return self._get("/v1/streams").json()["streams"]

    def stream(self, stream_id: str) -> dict[str, Any]:
        """``GET /v1/streams/{id}``."""
        return self._get(f"/v1/streams/{stream_id}").json()

    def create_stream(self, stream_id: str, source: str | dict[str, Any] | None = None,
                      fps: float | None = None) -> dict[str, Any]:
        """``POST /v1/streams``: a new stream, optionally pulling ``source`` (a path or URL on the
        server's machine, or a dict of ``protocol.SourceSpec`` fields)."""
        body: dict[str, Any] = {"id": stream_id}
        if source is not None:
            body["source"] = {"location": source} if isinstance(source, str) else dict(source)
        if fps is not None:
            body["fps"] = fps
        return self._check(self._http.post("/v1/streams", json=body)).json()

    def delete_stream(self, stream_id: str) -> None:
        """``DELETE /v1/streams/{id}``."""
        self._check(self._http.delete(f"/v1/streams/{stream_id}"))

    # ------------------------------------------------------------------ frames
    def push(self, stream_id: str, frames: Any, timestamps: Sequence[float] | None = None) -> dict[str, Any]:
        """``POST /v1/streams/{id}/frames``.

        Args:
            frames: ``uint8 [n, H, W, 3]`` (sent as ``.npy``), or a list of image files (paths) or
                encoded JPEG/PNG bytes (sent as multipart).
            timestamps: stream seconds of the frames (default: continuing at the stream's fps).
        """
        if isinstance(frames, np.ndarray):
            buf = io.BytesIO()
            np.save(buf, frames, allow_pickle=False)
            params = {"timestamps": ",".join(repr(float(t)) for t in timestamps)} if timestamps is not None else None
            r = self._http.post(f"/v1/streams/{stream_id}/frames", content=buf.getvalue(), params=params,
                                headers={"Content-Type": "application/x-npy"})
            return self._check(r).json()
        if isinstance(frames, (str, bytes, Path)):
            frames = [frames]
        files = []
        for i, f in enumerate(frames):
            if isinstance(f, (str, Path)):
                p = Path(f)
                files.append(("frame", (p.name, p.read_bytes())))
            elif isinstance(f, (bytes, bytearray)):
                files.append(("frame", (f"frame{i}", bytes(f))))
            else:
                raise InputError(f"frames: expected an array, image paths or image bytes; got {type(f).__name__}")
        data = {"timestamps": json.dumps([float(t) for t in timestamps])} if timestamps is not None else None
        return self._check(self._http.post(f"/v1/streams/{stream_id}/frames", files=files, data=data)).json()

    def thumbnail(self, stream_id: str, index: int) -> bytes:
        """``GET /v1/streams/{id}/frames/{index}.jpg``: JPEG bytes."""
        return self._get(f"/v1/streams/{stream_id}/frames/{int(index)}.jpg").content

    # ------------------------------------------------------------------ questions
    def _ask_body(self, question: str, since: Any, until: Any, max_new_tokens: int | None,
                  top_k: dict[str, int] | None, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"question": question, "stream": stream}
        for k, v in (("since", since), ("until", until), ("max_new_tokens", max_new_tokens), ("top_k", top_k)):
            if v is not None:
                body[k] = v
        return body

    def ask(self, stream_id: str, question: str, since: Any = None, until: Any = None,
            max_new_tokens: int | None = None, top_k: dict[str, int] | None = None) -> dict[str, Any]:
        """``POST /v1/streams/{id}/ask``: the answer (``text``, ``blocks``, ``kv_tokens``, ``timings``, ``notes``)."""
        body = self._ask_body(question, since, until, max_new_tokens, top_k, False)
        return self._check(self._http.post(f"/v1/streams/{stream_id}/ask", json=body)).json()

    def ask_stream(self, stream_id: str, question: str, since: Any = None, until: Any = None,
                   max_new_tokens: int | None = None, top_k: dict[str, int] | None = None
                   ) -> Iterator[str | dict[str, Any]]:
        """The answer as it is decoded: text pieces (``str``), then the whole answer (``dict``)."""
        body = self._ask_body(question, since, until, max_new_tokens, top_k, True)
        with self._http.stream("POST", f"/v1/streams/{stream_id}/ask", json=body) as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            for event, data in _events(r.iter_lines()):
                if event == "token":
                    yield data["text"]
                elif event == "answer":
                    yield data
                elif event == "error":
                    raise _error(None, data.get("error", "ServerError"), data.get("detail", ""))

    def metrics(self) -> str:
        """``GET /metrics``: Prometheus text."""
        return self._get("/metrics").text


def _error(status: int | None, kind: str, detail: str) -> MukvError:
    """The server's error as mukv's error class of that name (``InputError``, ...), else
    :class:`ServerError`; either way with ``status`` and ``kind`` attributes."""
    cls = getattr(_errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, MukvError) and cls not in (MukvError, _errors.UnknownPluginError):
        err: MukvError = cls(detail)
    else:
        err = ServerError(status or 0, kind, detail)
    err.status, err.kind = status, kind  # type: ignore[attr-defined]
    return err


def _events(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    if data:
        yield event, json.loads("\n".join(data))
