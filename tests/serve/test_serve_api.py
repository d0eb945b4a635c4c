"""The HTTP API through mukv.Client: every endpoint on its happy path."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

import mukv
from serve_helpers import frames, stored, wait_until

QUESTION = "what color was the circle?"


def test_streams_push_ask_thumbnails_metrics(serve):
    with serve() as (c, app, url):
        assert c.health()["status"] == "ok" and c.streams() == []
        created = c.create_stream("cam-1")
        assert created["id"] == "cam-1" and created["role"] == "writer" and created["frames"] == 0
        r = c.push("cam-1", frames(6))
        assert r["accepted"] == 6 and (r["t_start"], r["t_end"]) == (0.0, 10.0)  # 0.5 fps by default
        pngs = []
        for f in frames(2, seed=1):
            buf = io.BytesIO()
            Image.fromarray(f).save(buf, "PNG")
            pngs.append(buf.getvalue())
        r = c.push("cam-1", pngs, timestamps=[20.0, 21.5])
        assert (r["accepted"], r["t_start"], r["t_end"]) == (2, 20.0, 21.5)
        st = stored(c, "cam-1", 8)
        assert st["received"] == 8 and st["dropped"] == 0 and st["t_end"] == 21.5 and st["bytes"] > 0
        assert [s["id"] for s in c.streams()] == ["cam-1"]

        answer = c.ask("cam-1", QUESTION, max_new_tokens=3)
        assert set(answer) == {"question", "text", "blocks", "kv_tokens", "timings", "notes", "frames", "t_end"}
        assert answer["frames"] == 8 and answer["t_end"] == 21.5
        assert answer["question"] == QUESTION and answer["kv_tokens"] > 0 and answer["blocks"]
        b = answer["blocks"][0]
        assert {"level", "block_id", "score", "frame_start", "frame_end", "t_start", "t_end", "wall_start",
                "wall_end", "tokens"} <= set(b)
        assert {"query", "retrieve", "total", "wait"} <= set(answer["timings"])

        jpg = c.thumbnail("cam-1", b["frame_start"])
        im = Image.open(io.BytesIO(jpg))
        assert im.format == "JPEG" and max(im.size) <= 96

        metrics = c.metrics()
        for name in ("mukv_frames_received_total", "mukv_frames_stored_total", "mukv_frames_dropped_total",
                     "mukv_stream_lag_seconds", "mukv_queue_frames", "mukv_hot_bytes", "mukv_disk_bytes",
                     "mukv_ingest_batch_frames_bucket", "mukv_question_seconds_bucket"):
            assert name in metrics, name
        assert 'mukv_frames_stored_total{stream="cam-1"} 8' in metrics
        assert re.search(r'mukv_question_seconds_count\{stage="first_token"\} 1\b', metrics)
        for line in metrics.splitlines():  # the text format: comments or `name{labels} value`
            assert line.startswith("# ") or re.fullmatch(r'mukv_[a-z_]+(\{[^}]*\})? [-+0-9.eInfNa]+', line), line

        c.delete_stream("cam-1")
        assert c.streams() == []
        with pytest.raises(mukv.MukvError, match="no stream"):
            c.stream("cam-1")


def test_streamed_answer_equals_the_answer(serve):
    with serve() as (c, app, url):
        c.create_stream("s")
        c.push("s", frames(8))
        stored(c, "s", 8)
        whole = c.ask("s", QUESTION, max_new_tokens=6)
        events = list(c.ask_stream("s", QUESTION, max_new_tokens=6))
        pieces, final = events[:-1], events[-1]
        assert all(isinstance(p, str) for p in pieces) and isinstance(final, dict)
        assert final["text"] == whole["text"]
        assert "".join(pieces).strip() == final["text"]
        assert [(b["level"], b["block_id"]) for b in final["blocks"]] == [(b["level"], b["block_id"])
                                                                           for b in whole["blocks"]]


def test_streamed_error_before_any_token_is_a_plain_4xx(serve):
    with serve() as (c, app, url):
        c.create_stream("empty")
        with pytest.raises(mukv.MukvError, match="nothing is stored") as e:
            list(c.ask_stream("empty", QUESTION))
        assert e.value.status == 409


def test_restart_resumes_streams_and_gaps(serve, tmp_path):
    store = tmp_path / "store"
    with serve(store) as (c, app, url):
        c.create_stream("a")
        c.push("a", frames(5))
        stored(c, "a", 5)
    with serve(store) as (c, app, url):
        st = c.stream("a")
        assert st["frames"] == 5 and st["role"] == "writer" and st["t_end"] == 8.0
        r = c.push("a", frames(2, seed=3))
        assert r["t_start"] == 10.0  # continues the stream's time
        assert stored(c, "a", 7)["t_end"] == 12.0
        assert c.ask("a", QUESTION, max_new_tokens=2)["blocks"]


def test_sources_folder_and_video_file(serve, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, f in enumerate(frames(5, seed=4)):
        Image.fromarray(f).save(folder / f"{i:03d}.png")
    av = pytest.importorskip("av")
    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as out:
        s = out.add_stream("mpeg4", rate=2)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        for i in range(8):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 25, np.uint8), format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    with serve() as (c, app, url):
        st = c.create_stream("folder", source=str(folder), fps=1.0)
        assert st["source"] == f"images:{folder}"
        st = stored(c, "folder", 5)
        assert st["t_end"] == 4.0 and st["dropped"] == 0
        wait_until(lambda: c.stream("folder")["state"] == "source ended", 30, what="the source to end")
        c.create_stream("video", source={"location": str(video), "kind": "video", "fps": 2.0})
        st = stored(c, "video", 8)
        assert st["t_end"] == pytest.approx(3.5)
        with pytest.raises(mukv.InputError, match="not found|cannot"):
            c.create_stream("missing", source=str(tmp_path / "nope.mp4"))
        assert "missing" not in [s["id"] for s in c.streams()]  # a refused source leaves no stream


def test_client_typed_errors_and_openapi(serve):
    with serve() as (c, app, url):
        import httpx

        schema = httpx.get(url + "/openapi.json").json()
        paths = set(schema["paths"])
        assert {"/v1/streams", "/v1/streams/{stream_id}", "/v1/streams/{stream_id}/frames",
                "/v1/streams/{stream_id}/frames/{index}.jpg", "/v1/streams/{stream_id}/ask", "/healthz",
                "/metrics"} <= paths
        assert httpx.get(url + "/docs").status_code == 200
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "mukv" in page.text and "/static/app.js" in page.text
        assert httpx.get(url + "/static/app.js").status_code == 200
        c.create_stream("x")
        with pytest.raises(mukv.MukvError) as e:
            c.create_stream("x")
        assert e.value.status == 409


def test_time_window_passes_through_to_the_session(serve):
    """since/until reach Session.ask: only the blocks inside the window answer; a bad window is a 4xx."""
    with serve() as (c, app, url):
        c.create_stream("w")
        c.push("w", frames(8))
        stored(c, "w", 8)
        answer = c.ask("w", QUESTION, since=4.0, until=10.0, max_new_tokens=2)
        assert answer["blocks"] and all(4.0 <= b["t_start"] and b["t_end"] <= 10.0 for b in answer["blocks"])
        with pytest.raises(mukv.MukvError, match="before") as e:
            c.ask("w", QUESTION, since=10.0, until=4.0)
        assert 400 <= e.value.status < 500
        assert c.ask("w", QUESTION, max_new_tokens=2)["blocks"]  # without a window: answered


def test_the_client_refuses_bad_arguments_and_names_a_server_it_cannot_reach():
    """Without a server: every argument checked before anything is sent, and a refused connection is
    an UnreachableError (a MukvError) naming the server and the request, not httpx's exception."""
    from serve_helpers import free_port

    from mukv.client import UnreachableError

    for url in (None, 5, "", "not a url", "ftp://host", "http://"):
        with pytest.raises(mukv.InputError, match="url must be"):
            mukv.Client(url)
    for timeout in (0, -1, float("nan"), "5", True):
        with pytest.raises(mukv.InputError, match="timeout"):
            mukv.Client("http://127.0.0.1:1", timeout=timeout)
    with pytest.raises(mukv.InputError, match="token"):
        mukv.Client("http://127.0.0.1:1", token=5)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with mukv.Client(url, timeout=2) as c:
        for call in (c.health, c.streams, c.metrics, lambda: c.stream("cam"), lambda: c.ask("cam", "what?"),
                     lambda: list(c.ask_stream("cam", "what?")), lambda: c.push("cam", frames(1)),
                     lambda: c.create_stream("cam"), lambda: c.delete_stream("cam")):
            with pytest.raises(UnreachableError, match=re.escape(url)):
                call()
        bad = [(lambda: c.stream(None), "stream_id"), (lambda: c.stream(""), "stream_id"),
               (lambda: c.ask("cam", 5), "question"), (lambda: c.ask("cam", "q", since=object()), "since"),
               (lambda: c.ask("cam", "q", until=float("nan")), "until"), (lambda: c.push("cam", None), "frames"),
               (lambda: c.push("cam", ["/nonexistent/frame.jpg"]), "cannot read"),
               (lambda: c.push("cam", frames(1), timestamps=["a"]), "timestamps"),
               (lambda: c.thumbnail("cam", "x"), "index"), (lambda: c.create_stream("cam", source=5), "source")]
        for call, what in bad:
            with pytest.raises(mukv.InputError, match=what):
                call()
