"""Bad and hostile input: every one a 4xx with a message, never a 500, and nothing stored changes."""

from __future__ import annotations

import io
import json
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_helpers import frames, stored


def npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def npy_header(shape, descr="|u1", body=b"") -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    pad = 64 - (10 + len(header) + 1) % 64
    header += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + body


def png_bomb(w: int, h: int) -> bytes:
    """A valid PNG header claiming w x h pixels, with a tiny (invalid) body."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b""))


def jpeg(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


NPY = {"Content-Type": "application/x-npy"}
GOOD = frames(2)

PUSHES = [
    ("float npy", dict(content=npy(GOOD.astype(np.float32)), headers=NPY), "uint8"),
    ("object npy (pickle)", dict(content=npy(np.array([{"a": 1}], dtype=object)), headers=NPY), "uint8"),
    ("wrong shape", dict(content=npy(np.zeros((2, 8, 8), np.uint8)), headers=NPY), "shape"),
    ("4 channels", dict(content=npy(np.zeros((1, 8, 8, 4), np.uint8)), headers=NPY), "shape"),
    ("empty batch", dict(content=npy(np.zeros((0, 8, 8, 3), np.uint8)), headers=NPY), "no frames"),
    ("1x1 frames", dict(content=npy(np.zeros((1, 1, 1, 3), np.uint8)), headers=NPY), "too small"),
    ("truncated npy", dict(content=npy(GOOD)[:-100], headers=NPY), "bytes"),
    ("huge npy header", dict(content=npy_header((10**6, 10**5, 10**5, 3)), headers=NPY), "max_frame"),
    ("negative shape", dict(content=npy_header((-1, 8, 8, 3)), headers=NPY), ""),
    ("garbage header", dict(content=b"\x93NUMPY\x01\x00\x10\x00{not python}    \n", headers=NPY), "header"),
    ("not npy", dict(content=b"hello", headers=NPY), "NUMPY"),
    ("no content type", dict(content=b"hello"), "Content-Type"),
    ("json body", dict(json={"frames": [1, 2]}), "Content-Type"),
    ("corrupt jpeg", dict(files=[("frame", ("a.jpg", jpeg(GOOD[0])[:200]))]), "image"),
    ("garbage image", dict(files=[("frame", ("a.png", b"\x89PNG garbage"))]), "image"),
    ("empty image", dict(files=[("frame", ("a.png", b""))]), "empty"),
    ("gif", dict(files=[("frame", ("a.gif", (lambda b: (Image.fromarray(GOOD[0]).save(b, "GIF"), b.getvalue())[1])(io.BytesIO())))]), "JPEG or PNG"),
    ("png bomb", dict(files=[("frame", ("bomb.png", png_bomb(60000, 60000)))]), "max_frame_pixels"),
    ("mixed sizes", dict(files=[("frame", ("a.jpg", jpeg(GOOD[0]))), ("frame", ("b.jpg", jpeg(frames(1, size=32)[0])))]), "one size"),
    ("no frames", dict(files=[("other", ("a.jpg", jpeg(GOOD[0])))]), "unknown form field"),
    ("frame as text", dict(files=[("frame", (None, b"abc"))]), "file part"),
    ("NaN timestamps", dict(content=npy(GOOD), headers=NPY, params={"timestamps": "NaN,1"}), "finite"),
    ("inf timestamps", dict(files=[("frame", ("a.jpg", jpeg(GOOD[0])))], data={"timestamps": "[Infinity]"}), "finite"),
    ("text timestamps", dict(content=npy(GOOD), headers=NPY, params={"timestamps": "a,b"}), "numbers"),
    ("bad JSON timestamps", dict(files=[("frame", ("a.jpg", jpeg(GOOD[0])))], data={"timestamps": "[1,"}), "JSON"),
    ("too few timestamps", dict(content=npy(GOOD), headers=NPY, params={"timestamps": "1"}), "timestamps"),
    ("decreasing timestamps", dict(content=npy(GOOD), headers=NPY, params={"timestamps": "5,4"}), "increasing"),
    ("timestamps in the past", dict(content=npy(GOOD), headers=NPY, params={"timestamps": "-5,-4"}), "continue"),
    ("other frame size", dict(content=npy(frames(1, size=32)), headers=NPY), "frame size"),
]


@pytest.mark.parametrize("name,request_kwargs,message", PUSHES, ids=[p[0] for p in PUSHES])
def test_bad_pushes_are_4xx_and_store_nothing(serve_once, name, request_kwargs, message):
    url, c = serve_once
    before = c.stream("s")
    r = httpx.post(url + "/v1/streams/s/frames", **request_kwargs)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "detail"} and body["detail"]
    assert message.lower() in body["detail"].lower(), body
    after = c.stream("s")
    assert (after["received"], after["frames"]) == (before["received"], before["frames"])


REQUESTS = [
    ("bad stream id", "post", "/v1/streams", dict(json={"id": "../etc"}), 422),
    ("id with quote", "post", "/v1/streams", dict(json={"id": "a'b"}), 422),
    ("id too long", "post", "/v1/streams", dict(json={"id": "a" * 200}), 422),
    ("extra field", "post", "/v1/streams", dict(json={"id": "ok", "evil": 1}), 422),
    ("bad JSON", "post", "/v1/streams", dict(content=b"{not json", headers={"Content-Type": "application/json"}), 422),
    ("JSON list", "post", "/v1/streams", dict(json=[1, 2]), 422),
    ("negative fps", "post", "/v1/streams", dict(json={"id": "ok", "fps": -1}), 422),
    ("bad source kind", "post", "/v1/streams", dict(json={"id": "ok", "source": {"location": "x", "kind": "shell"}}), 422),
    ("missing source", "post", "/v1/streams", dict(json={"id": "ok2", "source": {"location": "/nonexistent/x.mp4"}}), 422),
    ("bad source option", "post", "/v1/streams", dict(json={"id": "ok3", "source": {"location": "/tmp", "kind": "images", "options": {"chunk": "many"}}}), 422),
    ("unknown source option", "post", "/v1/streams", dict(json={"id": "ok4", "source": {"location": "/tmp", "kind": "images", "options": {"evil": 1}}}), 422),
    ("unknown stream", "get", "/v1/streams/nope", {}, 404),
    ("bad id in path", "get", "/v1/streams/..", {}, 404),
    ("bad id in path 2", "get", "/v1/streams/a%20b", {}, 422),
    ("delete unknown", "delete", "/v1/streams/nope", {}, 404),
    ("push to unknown", "post", "/v1/streams/nope/frames", dict(content=npy(GOOD), headers=NPY), 404),
    ("empty question", "post", "/v1/streams/s/ask", dict(json={"question": ""}), 422),
    ("blank question", "post", "/v1/streams/s/ask", dict(json={"question": "   "}), 422),
    ("question not a string", "post", "/v1/streams/s/ask", dict(json={"question": 5}), 422),
    ("huge max_new_tokens", "post", "/v1/streams/s/ask", dict(json={"question": "q", "max_new_tokens": 10**9}), 422),
    ("zero max_new_tokens", "post", "/v1/streams/s/ask", dict(json={"question": "q", "max_new_tokens": 0}), 422),
    ("bad top_k level", "post", "/v1/streams/s/ask", dict(json={"question": "q", "top_k": {"nope": 1}}), 422),
    ("negative top_k", "post", "/v1/streams/s/ask", dict(json={"question": "q", "top_k": {"frame": -1}}), 422),
    ("top_k too large", "post", "/v1/streams/s/ask", dict(json={"question": "q", "top_k": {"frame": 10**6}}), 422),
    ("NaN since", "post", "/v1/streams/s/ask", dict(content=b'{"question": "q", "since": NaN}', headers={"Content-Type": "application/json"}), 422),
    ("too long question", "post", "/v1/streams/s/ask", dict(json={"question": "why " * 2000}), 422),
    ("lone surrogate", "post", "/v1/streams/s/ask", dict(content=b'{"question": "\\ud800"}', headers={"Content-Type": "application/json"}), 422),
    ("ask bad JSON", "post", "/v1/streams/s/ask", dict(content=b"nope", headers={"Content-Type": "application/json"}), 422),
    ("thumbnail out of range", "get", "/v1/streams/s/frames/99999.jpg", {}, 404),
    ("thumbnail negative", "get", "/v1/streams/s/frames/-1.jpg", {}, 404),
    ("thumbnail huge", "get", "/v1/streams/s/frames/99999999999999999999999.jpg", {}, 413),
    ("thumbnail not int", "get", "/v1/streams/s/frames/abc.jpg", {}, 422),
    ("unknown route", "get", "/v2/nothing", {}, 404),
    ("wrong method", "put", "/v1/streams", {}, 405),
]


@pytest.mark.parametrize("name,method,path,request_kwargs,status", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_bad_requests_are_4xx_with_a_message(serve_once, name, method, path, request_kwargs, status):
    url, c = serve_once
    r = httpx.request(method.upper(), url + path, **request_kwargs)
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["detail"] and body["error"]


def test_body_limits(serve):
    with serve(max_upload_bytes=100_000, max_frames_per_push=4, max_frame_pixels=64 * 64) as (c, app, url):
        c.create_stream("s")
        big = npy(frames(40))
        r = httpx.post(url + "/v1/streams/s/frames", content=big, headers=NPY)
        assert r.status_code == 413 and "max_upload_bytes" in r.json()["detail"]

        def chunked():  # no Content-Length: the limit holds while reading
            for i in range(0, len(big), 8192):
                yield big[i:i + 8192]
        r = httpx.post(url + "/v1/streams/s/frames", content=chunked(), headers=NPY)
        assert r.status_code == 413
        r = httpx.post(url + "/v1/streams/s/frames", content=npy(frames(5)), headers=NPY)
        assert r.status_code == 413 and "max_frames_per_push" in r.json()["detail"]
        r = httpx.post(url + "/v1/streams/s/frames", content=npy(frames(1, size=80)), headers=NPY)
        assert r.status_code == 413 and "max_frame_pixels" in r.json()["detail"]
        assert c.stream("s")["received"] == 0


@pytest.fixture(scope="module")
def serve_once(tmp_path_factory, tiny_model):
    """One server for the parametrized cases: a stream "s" with frames stored."""
    from serve_helpers import serving

    with serving(tmp_path_factory.mktemp("hostile") / "store", tiny_model) as (c, app, url):
        c.create_stream("s")
        c.push("s", frames(6))
        stored(c, "s", 6)
        yield url, c


def test_an_address_that_cannot_be_taken_is_a_config_error_before_anything_loads(tmp_path):
    # once a raw OSError ("[Errno 98] Address already in use", "[Errno -2] Name or service not known")
    import socket

    import mukv
    from mukv.serve import api_server
    from mukv.serve.config import ServeConfig

    store = tmp_path / "s"
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(mukv.ConfigError, match=f"cannot listen on '127.0.0.1' port {port}: Address already in use"):
            api_server.run(ServeConfig(store=str(store), port=port))
    with pytest.raises(mukv.ConfigError, match="cannot listen on 'no-such-host.invalid' port"):
        api_server.run(ServeConfig(store=str(store), host="no-such-host.invalid", token="t" * 20, port=0))
    assert not store.exists()  # nothing loaded, nothing created
