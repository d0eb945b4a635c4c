"""Several servers over one s3:// store (moto on loopback): one writer per stream through leases kept
by the object store's conditional writes, any server answers, a dead server's streams are taken over,
and a writer that lost its lease can never commit."""

from __future__ import annotations

import json
import signal
import time

import pytest

import mukv
from serve_helpers import Process, frames, stored, wait_until


def _files(storage, root):
    from mukv.backends.disk.files import Files

    return Files(root, storage)


def test_lease_is_exclusive_fenced_and_taken_over(moto_s3):
    from mukv.backends.disk.lease import LeaseHeld, StreamLease
    from mukv.errors import StoreError

    storage, _ = moto_s3
    files = _files(storage, "s3://mukv/lease-unit")
    a = StreamLease(files, "streams/x.json", ttl=1.5, owner="server-a", clock_skew=0.0)
    b = StreamLease(files, "streams/x.json", ttl=1.5, owner="server-b", clock_skew=0.0)
    assert a.try_acquire() and a.held
    a.write_state({"counts": {"frame": 1}})
    assert not b.try_acquire()  # held and renewed
    with pytest.raises(LeaseHeld, match="server-a"):
        b.acquire()
    time.sleep(1.0)
    assert not b.try_acquire() and a.held  # a renews every ttl / 3
    a._stop.set()  # a stops renewing: as if its process hung
    a._thread.join()
    wait_until(b.try_acquire, 10, 0.1, "b to take the expired lease")
    state = files.read_json("streams/x.json")
    assert state["counts"] == {"frame": 1} and state["lease"]["owner"] == "server-b"
    with pytest.raises(StoreError, match="lease"):  # a cannot commit: its version of the state is stale
        a._valid_until = time.monotonic() + 100  # even if it believes its lease is still valid
        a.write_state({"counts": {"frame": 99}})
    assert files.read_json("streams/x.json")["counts"] == {"frame": 1}
    b.write_state({"counts": {"frame": 2}})
    b.release()
    assert files.read_json("streams/x.json")["lease"]["owner"] is None
    c = StreamLease(files, "streams/x.json", ttl=1.5, owner="server-c")
    assert c.try_acquire()  # a released lease is taken at once
    c.release()


def test_backend_writer_that_lost_its_stream_commits_nothing(moto_s3, tiny_model):
    storage, _ = moto_s3
    uri = "s3://mukv/fence"
    opts = {"storage_options": storage, "lease_ttl": 2.0, "clock_skew": 0.0, "commit_interval": 0.0}
    a = mukv.Session(model=tiny_model, backend="lancedb", path=uri, stream_id="cam",
                     backend_options={**opts, "lease_owner": "a"})
    a.feed(frames(4))
    a.backend.flush()
    a.backend.lease._stop.set()  # a hangs: no renewals
    with pytest.raises(mukv.StoreError, match="being written by 'a'"):  # a second writer is refused, naming a
        mukv.Session.open(uri, stream_id="cam", model=tiny_model, backend_options={**opts, "lease_owner": "b"})
    held = mukv.Session.open(uri, stream_id="cam", model=tiny_model, read_only=True,
                             backend_options={**opts, "lease_owner": "b"})
    assert held.backend.read_only
    held.close()
    time.sleep(2.5)
    b = mukv.Session.open(uri, stream_id="cam", model=tiny_model, backend_options={**opts, "lease_owner": "b"})
    assert not b.backend.read_only and b.stats()["frames"] == 4
    a.backend.lease._valid_until = time.monotonic() + 100  # a still believes it holds the stream
    with pytest.raises(mukv.StoreError, match="lease"):
        a.feed(frames(2, seed=1))
        a.backend.flush()
    b.feed(frames(3, seed=2))
    b.close()
    try:  # closing writes nothing more; it may say again what was not stored (the lease was lost)
        a.close()
    except mukv.StoreError as exc:
        assert "lease" in str(exc)
    again = mukv.Session.open(uri, stream_id="cam", model=tiny_model, backend_options=opts)
    assert again.stats()["frames"] == 7 and again.backend.verify()["ok"]
    again.close()


@pytest.mark.slow
def test_two_servers_share_a_store_and_take_over_a_dead_one(moto_s3, tmp_path):
    storage, env = moto_s3
    store = "s3://mukv/serve"
    opts = json.dumps({"storage_options": storage, "lease_ttl": 3.0, "clock_skew": 1.0, "commit_interval": 0.1})
    args = ("--model", "tiny-llava-ov", "--backend-options", opts, "--refresh", "0.3")
    a = Process(store, *args, env=env, log_dir=tmp_path).wait_up()
    b = Process(store, *args, env=env, log_dir=tmp_path).wait_up()
    try:
        a.client.create_stream("cam")
        a.client.push("cam", frames(6))
        stored(a.client, "cam", 6)
        # the other server sees the stream, as a reader, and answers questions about it
        st = wait_until(lambda: (lambda s: s if s and s[0]["frames"] == 6 else None)(b.client.streams()), 60,
                        what="server b to see the stream")[0]
        assert st["role"] == "reader" and st["owner"] and st["owner"] == a.client.health()["server"]
        answer = b.client.ask("cam", "what happened?", max_new_tokens=2)
        assert answer["blocks"] and max(x["frame_end"] for x in answer["blocks"]) <= 6
        with pytest.raises(mukv.MukvError, match="push its frames there") as e:
            b.client.push("cam", frames(1))
        assert e.value.status == 409
        b.client.create_stream("door")  # b writes another stream of the same store
        b.client.push("door", frames(3, seed=5))
        stored(b.client, "door", 3)
        wait_until(lambda: any(s["id"] == "door" and s["frames"] == 3 and s["role"] == "reader"
                               for s in a.client.streams()), 60, what="server a to see b's stream")
        a.client.push("cam", frames(2, seed=1))
        stored(a.client, "cam", 8)
        wait_until(lambda: b.client.stream("cam")["frames"] == 8, 60, what="the 8 frames to be committed")

        a.kill()  # kill -9: no clean close, the lease is left to expire
        st = wait_until(lambda: (lambda s: s if s["role"] == "writer" else None)(b.client.stream("cam")), 60,
                        what="server b to take the stream over")
        assert st["frames"] == 8 and st["t_end"] == 14.0
        r = b.client.push("cam", frames(2, seed=2))
        assert r["t_start"] == 16.0  # the stream goes on exactly where the dead server committed it
        stored(b.client, "cam", 10)

        c = Process(store, *args, env=env, log_dir=tmp_path).wait_up()  # a server restarted: a reader until b stops
        try:
            wait_until(lambda: {s["id"]: s["role"] for s in c.client.streams()} == {"cam": "reader", "door": "reader"},
                       60, what="server c to read both streams")
            assert b.stop(signal.SIGTERM) == 143  # a clean stop releases the leases: c takes over at once
            st = wait_until(lambda: (lambda s: s if all(x["role"] == "writer" for x in s) else None)(c.client.streams()),
                            60, what="server c to take both streams")
            assert {s["id"]: s["frames"] for s in st} == {"cam": 10, "door": 3}
            c.client.push("door", frames(1, seed=9))
            stored(c.client, "door", 4)
        finally:
            c.stop()
    finally:
        for p in (a, b):
            if p.proc.poll() is None:
                p.kill()
    from mukv.backends.disk.verify import verify_store

    report = verify_store(store, storage_options=storage)  # every committed block intact, no duplicates
    assert report.ok, [p.line() for p in report.problems]


def test_a_server_that_loses_a_stream_goes_on_as_its_reader(moto_s3, tiny_model):
    """A writer whose lease another server took (it stalled past the lease) refuses nothing silently:
    its next commit fails before writing, and the stream turns into a reader of the new writer."""
    from serve_helpers import serving
    from mukv.backends.disk.lease import StreamLease

    storage, _ = moto_s3
    opts = {"storage_options": storage, "lease_ttl": 2.0, "clock_skew": 0.0, "commit_interval": 0.05}
    with serving("s3://mukv/demote", tiny_model, backend_options=opts, refresh_s=0.2) as (c, app, url):
        c.create_stream("cam")
        c.push("cam", frames(3))
        stored(c, "cam", 3)
        wait_until(lambda: app.state.engine.get("cam").numbers["frames"] == 3, 30, what="a commit")
        backend = app.state.engine.get("cam").session.backend
        backend.flush()  # nothing left to commit (a commit renews the lease)
        backend.lease._stop.set()  # the server stalls: no renewals
        thief = StreamLease(backend.files, "streams/cam.json", ttl=30.0, owner="other-server", clock_skew=0.0)
        wait_until(thief.try_acquire, 30, 0.2, "the other server to take the expired lease")
        c.push("cam", frames(2, seed=1))
        st = wait_until(lambda: (lambda s: s if s["role"] == "reader" else None)(c.stream("cam")), 30,
                        what="the stream to become a reader")
        assert st["owner"] == "other-server" and st["frames"] == 3
        with pytest.raises(mukv.MukvError, match="other-server"):
            c.push("cam", frames(1, seed=2))
        assert c.ask("cam", "what happened?", max_new_tokens=2)["frames"] == 3
        thief.release()
        wait_until(lambda: c.stream("cam")["role"] == "writer", 30, what="the stream to be taken back")
