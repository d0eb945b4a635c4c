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

import contextlib
import io
import json
import numbers
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import quote, urlsplit

import numpy as np

from . import errors as _errors
from .errors import InputError, MukvError, expect_number


class ServerError(MukvError):
    """An error answered by the server that is not one of mukv's own classes.

    Attributes:
        status: the HTTP status code (``None`` for an error event of a streamed answer).
        kind: the server's error kind (``NotFound``, ``Conflict``, ``InputError``, ...).
    """

    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(f"{status} {kind}: {detail}")
        self.status, self.kind, self.detail = status, kind, detail


class UnreachableError(MukvError):
    """No answer from the server: it could not be reached, or the connection failed or timed out
    before its reply. A request that changes something (a push, a question, a new stream) may or
    may not have been applied; ``GET`` the stream to see.

    Attributes:
        url: the server.
    """

    def __init__(self, url: str, method: str, path: str, exc: BaseException):
        text = " ".join(str(exc).split()) or type(exc).__name__
        super().__init__(f"no answer from the mukv server at {url} to {method} {path}: {type(exc).__name__}: {text}")
        self.url = url


class Client:
    """A client of one ``mukv serve`` server.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        token: the bearer token, if the server needs one.
        timeout: seconds to wait for a reply (``None``: without limit).

    Raises:
        InputError: a URL that is not ``http://`` or ``https://``, a token that is not a string, or a
            timeout that is not a positive number of seconds.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0):
        import httpx

        if not isinstance(url, str) or urlsplit(url.strip()).scheme not in ("http", "https") \
                or not urlsplit(url.strip()).netloc:
            raise InputError(f"url must be the server's http:// or https:// address, e.g. http://127.0.0.1:8000; "
                             f"got {url!r}"[:300])
        if token is not None and (not isinstance(token, str) or not token.strip() or "\n" in token or "\r" in token):
            raise InputError("token must be the server's bearer token (a one-line string) or None")
        if timeout is not None:
            expect_number(timeout, "timeout (or None)", above=0, unit=" of seconds")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.strip().rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers,
                                  timeout=None if timeout is None else float(timeout))

    @contextlib.contextmanager
    def _reaching(self, method: str, path: str) -> Iterator[None]:
        """httpx's transport errors (refused, reset, timed out) as :class:`UnreachableError`."""
        import httpx

        try:
            yield
        except httpx.TransportError as exc:
            raise UnreachableError(self.url, method, path, exc) from None

    def _send(self, method: str, path: str, **kw: Any) -> Any:
        with self._reaching(method, path):
            return self._check(self._http.request(method, path, **kw))

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

        with self._reaching("GET", path):
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
        return self._get(_stream_path(stream_id)).json()

    def create_stream(self, stream_id: str, source: str | dict[str, Any] | None = None,
                      fps: float | None = None) -> dict[str, Any]:
        """``POST /v1/streams``: a new stream, optionally pulling ``source`` (a path or URL on the
        server's machine, or a dict of ``protocol.SourceSpec`` fields)."""
        _stream_path(stream_id)
        body: dict[str, Any] = {"id": stream_id}
        if source is not None:
            if not isinstance(source, (str, dict)):
                raise InputError(f"source must be a path or URL (str) or a dict of SourceSpec fields; got "
                                 f"{type(source).__name__}")
            body["source"] = {"location": source} if isinstance(source, str) else dict(source)
        if fps is not None:
            body["fps"] = fps
        return self._send("POST", "/v1/streams", json=_json_body(body)).json()

    def delete_stream(self, stream_id: str) -> None:
        """``DELETE /v1/streams/{id}``."""
        self._send("DELETE", _stream_path(stream_id))

    # ------------------------------------------------------------------ frames
    def push(self, stream_id: str, frames: Any, timestamps: Sequence[float] | None = None) -> dict[str, Any]:
        """``POST /v1/streams/{id}/frames``.

        Args:
            frames: ``uint8 [n, H, W, 3]`` (sent as ``.npy``), or a list of image files (paths) or
                encoded JPEG/PNG bytes (sent as multipart).
            timestamps: stream seconds of the frames (default: continuing at the stream's fps).
        """
        path = _stream_path(stream_id) + "/frames"
        times = _timestamps(timestamps)
        if isinstance(frames, np.ndarray):
            if frames.dtype == object:
                raise InputError("frames: expected uint8 [n, H, W, 3]; got an array of Python objects")
            buf = io.BytesIO()
            np.save(buf, frames, allow_pickle=False)
            params = {"timestamps": ",".join(repr(t) for t in times)} if times is not None else None
            return self._send("POST", path, content=buf.getvalue(), params=params,
                              headers={"Content-Type": "application/x-npy"}).json()
        if isinstance(frames, (str, bytes, Path)):
            frames = [frames]
        if not isinstance(frames, (list, tuple)):
            raise InputError(f"frames: expected an array, image paths or image bytes; got {type(frames).__name__}")
        files = []
        for i, f in enumerate(frames):
            if isinstance(f, (str, Path)):
                p = Path(f)
                try:
                    files.append(("frame", (p.name, p.read_bytes())))
                except OSError as exc:
                    raise InputError(f"frames: cannot read {p}: {exc.strerror or exc}") from None
            elif isinstance(f, (bytes, bytearray)):
                files.append(("frame", (f"frame{i}", bytes(f))))
            else:
                raise InputError(f"frames: expected an array, image paths or image bytes; got {type(f).__name__}")
        data = {"timestamps": json.dumps(times)} if times is not None else None
        return self._send("POST", path, files=files, data=data).json()

    def thumbnail(self, stream_id: str, index: int) -> bytes:
        """``GET /v1/streams/{id}/frames/{index}.jpg``: JPEG bytes."""
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise InputError(f"index must be a frame index (int); got {type(index).__name__}")
        return self._get(f"{_stream_path(stream_id)}/frames/{int(index)}.jpg").content

    # ------------------------------------------------------------------ questions
    def _ask_body(self, question: str, since: Any, until: Any, max_new_tokens: int | None,
                  top_k: dict[str, int] | None, stream: bool) -> dict[str, Any]:
        if not isinstance(question, str):
            raise InputError(f"question must be a string; got {type(question).__name__}")
        body: dict[str, Any] = {"question": question, "stream": stream}
        for k, v in (("since", since), ("until", until), ("max_new_tokens", max_new_tokens), ("top_k", top_k)):
            if v is not None:
                body[k] = v
        return _json_body(body)

    def ask(self, stream_id: str, question: str, since: Any = None, until: Any = None,
            max_new_tokens: int | None = None, top_k: dict[str, int] | None = None) -> dict[str, Any]:
        """``POST /v1/streams/{id}/ask``: the answer (``text``, ``blocks``, ``kv_tokens``, ``timings``, ``notes``)."""
        body = self._ask_body(question, since, until, max_new_tokens, top_k, False)
        return self._send("POST", _stream_path(stream_id) + "/ask", json=body).json()

    def ask_stream(self, stream_id: str, question: str, since: Any = None, until: Any = None,
                   max_new_tokens: int | None = None, top_k: dict[str, int] | None = None
                   ) -> Iterator[str | dict[str, Any]]:
        """The answer as it is decoded: text pieces (``str``), then the whole answer (``dict``)."""
        body = self._ask_body(question, since, until, max_new_tokens, top_k, True)
        path = _stream_path(stream_id) + "/ask"
        with self._reaching("POST", path), self._http.stream("POST", path, json=body) as r:
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


def _stream_path(stream_id: Any) -> str:
    """``/v1/streams/{id}`` with the id escaped (the server checks what an id may be)."""
    if not isinstance(stream_id, str) or not stream_id:
        raise InputError(f"stream_id must be a non-empty string; got {stream_id!r}"[:200])
    return "/v1/streams/" + quote(stream_id, safe="")


def _timestamps(timestamps: Any) -> list[float] | None:
    if timestamps is None:
        return None
    try:
        return [float(t) for t in np.asarray(timestamps, dtype=np.float64).reshape(-1)]
    except (TypeError, ValueError):
        raise InputError("timestamps must be a sequence of numbers (stream seconds)") from None


def _json_body(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` when JSON can carry it (InputError naming the field otherwise)."""
    for key, value in body.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{key}: {value!r:.60} cannot be sent as JSON ({exc})") from None
    return body


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
