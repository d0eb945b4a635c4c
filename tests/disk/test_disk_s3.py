"""The same backend on an S3-compatible object store (moto's server, started on loopback)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
import torch

import mukv
from disk_synth import LAYOUT, expected_kv, frames, synth_blocks
from mukv.session import Session

QUESTION = "what color was the car?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("moto.server", reason="the S3 test needs moto's server: pip install 'moto[server]'")
    pytest.importorskip("obstore", reason="zarr on S3 needs obstore: pip install obstore")
    boto3 = pytest.importorskip("boto3", reason="creating the test bucket needs boto3")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    # Session(...) and Session.open read a stream's recorded state before backend options apply,
    # so the object store is also described by the environment (and never by instance metadata)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_ENDPOINT_URL": endpoint,
           "AWS_ENDPOINT": endpoint, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
           "AWS_EC2_METADATA_DISABLED": "true"}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("moto server did not start")
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket="mukv")
        yield {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "aws_endpoint": endpoint,
               "aws_region": "us-east-1", "allow_http": "true"}
    finally:
        mp.undo()
        proc.terminate()
        proc.wait(timeout=10)


def test_backend_on_s3_round_trip_and_recovery(s3):
    from mukv.backends.disk import TieredBackend

    uri = "s3://mukv/synthetic"
    b = TieredBackend(LAYOUT, uri, "cpu", stream_id="cam", storage_options=s3, commit_interval=0.0,
                      hot_bytes=0)  # no hot tier: every read comes from S3
    for _ in range(3):
        for level in ("patch", "frame", "segment"):
            b.add(synth_blocks(level, b.count(level), 2))
        b.set_state("n", b.count("segment"))
    b.flush()
    counts = {lv: b.count(lv) for lv in ("patch", "frame", "segment")}
    for lv, n in counts.items():
        assert torch.equal(b.load_kv(lv, torch.arange(n)), expected_kv(lv, range(n)))
    assert b.tier_stats()["pagein"]["blocks_disk"] == sum(counts.values())  # all paged in from S3
    b.close()
    again = TieredBackend(LAYOUT, uri, "cpu", stream_id="cam", storage_options=s3)
    assert {lv: again.count(lv) for lv in counts} == counts and again.get_state("n") == 6
    assert again.verify()["ok"]
    ids, _ = again.search("segment", torch.randn(LAYOUT.vector_dim), 3)
    assert len(ids) == 3
    again.close()


def test_session_on_s3(s3, tiny_model):
    uri = "s3://mukv/session-store"
    s = Session(model=tiny_model, backend="lancedb", path=uri, stream_id="cam-1",
                backend_options={"storage_options": s3, "hot_bytes": 1 << 20, "hot_slab_bytes": 1 << 19})
    s.feed(frames(12))
    before = s.ask(QUESTION)
    s.close()
    again = Session.open(uri, stream_id="cam-1", model=tiny_model, backend_options={"storage_options": s3})
    assert again.stats()["frames"] == 12
    after = again.ask(QUESTION)
    assert [(b.level, b.block_id) for b in after.blocks] == [(b.level, b.block_id) for b in before.blocks]
    again.close()
    with pytest.raises(mukv.StoreError, match="no mukv stream"):
        Session.open("s3://mukv/nothing-here", model=tiny_model)


def test_codecs_on_s3(s3):
    """Arrays of two codecs in one stream on S3, an uncommitted third one removed by recovery."""
    from mukv.backends.disk import TieredBackend
    from mukv.backends.disk.files import Files
    from mukv.backends.disk.zarr_kv import KVArchive, to_numpy
    from mukv.kvcodec import build_codec

    uri = "s3://mukv/codecs"
    for spec in ("int4", "none"):
        b = TieredBackend(LAYOUT, uri, "cpu", stream_id="cam", storage_options=s3, commit_interval=0.0, hot_bytes=0,
                          codec=build_codec(spec))
        for level in ("patch", "frame", "segment"):
            b.add(synth_blocks(level, b.count(level), 2))
        b.flush()
        counts = {lv: b.count(lv) for lv in ("patch", "frame", "segment")}
        b.close()
    int8 = build_codec("int8")
    leftover = KVArchive(Files(uri, s3), "cam", LAYOUT.dtype, codec=int8)
    n = counts["frame"]
    leftover.write("frame", n, to_numpy(int8.encode_blocks(expected_kv("frame", [n])).rows),
                   tuple(expected_kv("frame", [0]).shape[1:]))
    again = TieredBackend(LAYOUT, uri, "cpu", stream_id="cam", storage_options=s3, hot_bytes=0)
    assert again.recovered["kv_rows"] == {"frame": 1}
    int4 = build_codec("int4")
    for lv, n in counts.items():
        assert [p.codec.name for p in again.archive.parts(lv)] == ["int4", "none"]
        half = n // 2
        want = torch.cat([int4.decode_blocks(int4.encode_blocks(expected_kv(lv, range(half))), "cpu"),
                          expected_kv(lv, range(half, n))])
        assert torch.equal(again.load_kv(lv, torch.arange(n)), want)
    assert again.verify()["ok"]
    again.close()
