"""Bearer-token authentication and the request body limit.

With a token configured, every route but ``/healthz`` and the page's static files needs
``Authorization: Bearer <token>`` (compared in constant time). The page asks for the token
and sends it with its own requests.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import TooLarge, Unauthorized


def require_token(request: Request) -> None:
    """FastAPI dependency: refuse a request without the server's bearer token (401)."""
    token = request.app.state.engine.config.token
    if token is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("this server needs a bearer token: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized("wrong bearer token")


class BodyLimit:
    """ASGI middleware: a request body larger than ``max_bytes`` is refused (413), whether its
    ``Content-Length`` says so up front or a chunked body grows past it while being read."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0 or declared > self.max_bytes:
                return await _refuse(send, 413 if declared > self.max_bytes else 400,
                                     "TooLarge" if declared > self.max_bytes else "InputError",
                                     f"request body of {length.decode(errors='replace')} bytes; the limit is "
                                     f"{self.max_bytes} (max_upload_bytes)" if declared > self.max_bytes
                                     else "invalid Content-Length")
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise TooLarge(f"request body larger than {self.max_bytes} bytes (max_upload_bytes)")
            return message

        return await self.app(scope, limited, send)


async def _refuse(send, status: int, kind: str, detail: str) -> None:
    import json

    body = json.dumps({"error": kind, "detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
