"""``mukv serve`` as a real process: SIGTERM and SIGINT stop every stream cleanly; the next start resumes."""

from __future__ import annotations

import signal

import pytest

from serve_helpers import Process, frames, stored, wait_until


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_commits_every_stream_and_restart_resumes(tmp_path, sig):
    store = tmp_path / "store"
    p = Process(store, "--model", "tiny-llava-ov", "--max-lag", "600",
                "--backend-options", '{"commit_interval": 5}').wait_up()
    try:
        for sid in ("a", "b"):
            p.client.create_stream(sid)
        p.client.push("a", frames(6))
        p.client.push("b", frames(3, seed=1), timestamps=[1.0, 2.0, 3.5])
        stored(p.client, "a", 6)
        stored(p.client, "b", 3)
        p.client.push("a", frames(40, seed=2))  # still queued when the signal comes: ingested before exit
    finally:
        rc = p.stop(sig)
    assert rc == 128 + sig, p.output()
    out = p.output()
    assert "Traceback" not in out and "2 stream(s) committed: a 46 frames, b 3 frames" in out, out
    if sig == signal.SIGINT:
        return  # the restart below is the same after either signal

    q = Process(store, "--model", "tiny-llava-ov").wait_up()
    try:
        a, b = q.client.stream("a"), q.client.stream("b")
        assert (a["frames"], a["t_end"], a["role"]) == (46, 90.0, "writer")
        assert (b["frames"], b["t_end"]) == (3, 3.5)
        r = q.client.push("a", frames(2, seed=3))
        assert (r["t_start"], r["t_end"]) == (92.0, 94.0)  # exactly the next times
        assert stored(q.client, "a", 48)["frames"] == 48
        with pytest.raises(Exception, match="continue the stream"):
            q.client.push("b", frames(1), timestamps=[3.5])
        assert q.client.ask("a", "what happened?", max_new_tokens=2)["blocks"]
    finally:
        assert q.stop() == 143


@pytest.mark.slow
def test_frames_left_after_the_drain_become_a_gap(tmp_path):
    store = tmp_path / "store"
    p = Process(store, "--model", "tiny-llava-ov", "--drain", "0", "--max-batch-frames", "1").wait_up()
    try:
        p.client.create_stream("a")
        p.client.push("a", frames(200))
    finally:
        assert p.stop() == 143, p.output()
    q = Process(store, "--model", "tiny-llava-ov").wait_up()
    try:
        a = q.client.stream("a")
        assert a["frames"] < 200 and a["frames"] + sum(g["frames"] for g in a["gaps"]) == 200
        assert a["gaps"][-1]["t_end"] == 398.0
        r = q.client.push("a", frames(1))
        assert r["t_start"] > a["t_end"]
    finally:
        q.stop()
