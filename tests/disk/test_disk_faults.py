"""Bad input and faults: hostile stream ids, foreign paths and stores, a full disk, readers beside a writer."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mukv
from disk_synth import LAYOUT, expected_kv, frames, synth_blocks
from mukv.backends.disk import TieredBackend
from mukv.backends.disk.zarr_kv import KVArchive
from mukv.blocks import KVLayout
from mukv.session import Session

HERE = Path(__file__).parent

HOSTILE = [
    "../escape", "a/b", "a\\b", "/abs", "..", ".", ".hidden", "x'; DROP TABLE blocks; --", "a' OR '1'='1",
    'quote"d', "sp ace", "", "a" * 129, "nul\x00", "new\nline", "ünïcode", "-rf", "a..b",
]


def backend(path, stream_id="s", **opts):
    opts.setdefault("commit_interval", 0.01)
    return TieredBackend(LAYOUT, str(path), "cpu", stream_id=stream_id, **opts)


def fill(b, windows=(3, 3, 2)):
    for level, w in zip(("patch", "frame", "segment"), windows):
        b.add(synth_blocks(level, b.count(level), w))


@pytest.mark.parametrize("sid", HOSTILE)
def test_hostile_stream_ids_are_refused(tmp_path, sid):
    store = tmp_path / "store"
    with pytest.raises(mukv.StoreError, match="invalid stream id"):
        backend(store, stream_id=sid)
    with pytest.raises(mukv.StoreError, match="invalid stream id"):
        TieredBackend.peek_state(str(store), sid, "session")
    assert not (tmp_path / "escape").exists()
    # nothing was created outside the store
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["store"])


def test_hostile_id_does_not_reach_other_streams(tmp_path):
    b = backend(tmp_path / "st", stream_id="victim")
    fill(b)
    b.flush()
    n = b.count("patch")
    with pytest.raises(mukv.StoreError):
        backend(tmp_path / "st", stream_id="victim' OR stream_id != '")
    assert b.table.count("victim", "patch") == n
    b.close()


def test_hostile_level_name_is_refused(tmp_path):
    b = backend(tmp_path / "st")
    blocks = synth_blocks("patch", 0, 1)
    blocks.level = "patch' OR '1'='1"
    with pytest.raises(mukv.StoreError, match="invalid level"):
        b.add(blocks)
    b.close()


def test_unknown_and_invalid_options(tmp_path):
    with pytest.raises(mukv.ConfigError, match="hot_byts"):
        backend(tmp_path / "a", hot_byts=1)
    with pytest.raises(mukv.ConfigError, match="hot_bytes"):
        backend(tmp_path / "b", hot_bytes=-5)
    with pytest.raises(mukv.UnknownPluginError, match="lru_segment"):
        backend(tmp_path / "c", eviction="nope")
    with pytest.raises(mukv.StoreError, match="path"):
        TieredBackend(LAYOUT, None, "cpu")


def test_not_a_store(tmp_path, tiny_model):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.txt").write_text("precious")
    with pytest.raises(mukv.StoreError, match="not a mukv store"):
        backend(tmp_path / "docs")
    assert sorted(os.listdir(tmp_path / "docs")) == ["thesis.txt"]  # untouched
    (tmp_path / "file").write_text("x")
    with pytest.raises(mukv.StoreError, match="not a mukv store"):
        backend(tmp_path / "file")
    with pytest.raises(mukv.StoreError, match="no mukv stream"):
        Session.open(tmp_path / "docs", model=tiny_model)
    with pytest.raises(mukv.StoreError, match="not a mukv store"):
        Session(model=tiny_model, backend="lancedb", path=tmp_path / "docs")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "mukv.json").write_text("{not json")
    with pytest.raises(mukv.StoreError, match="not valid JSON"):
        backend(tmp_path / "fake")


def test_store_of_another_model(tmp_path, tiny_model):
    b = backend(tmp_path / "st")
    fill(b)
    b.close()
    other = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16, model_id="synthetic:3x2x8")
    with pytest.raises(mukv.StoreError, match="another model.*num_layers"):
        TieredBackend(other, str(tmp_path / "st"), "cpu", stream_id="s")
    f32 = KVLayout(2, 2, 8, torch.float32, "synthetic:2x2x8")
    with pytest.raises(mukv.StoreError, match="dtype"):
        TieredBackend(f32, str(tmp_path / "st"), "cpu", stream_id="s")
    with pytest.raises(mukv.StoreError, match="another model"):
        Session(model=tiny_model, backend="lancedb", path=tmp_path / "st", stream_id="s")


def test_block_shape_mismatch_is_refused(tmp_path):
    b = backend(tmp_path / "st")
    blocks = synth_blocks("patch", 0, 1)
    blocks.kv = blocks.kv[:, :, :, :1]
    with pytest.raises(mukv.StoreError, match="layout"):
        b.add(blocks)
    b.add(synth_blocks("patch", 0, 1))
    wrong_k = synth_blocks("patch", 4, 1)
    wrong_k.kv = wrong_k.kv[..., :2, :]
    with pytest.raises(mukv.StoreError, match="tokens per block"):
        b.add(wrong_k)
    assert b.count("patch") == 4
    b.close()


def test_blocks_ending_before_they_start_are_refused(tmp_path):
    """The index's frame-range filters rely on frame_start <= frame_end: such a batch is refused whole."""
    b = backend(tmp_path / "st")
    blocks = synth_blocks("frame", 0, 4)
    blocks.frame_end = blocks.frame_start.clone()
    blocks.frame_end[2] -= 1
    with pytest.raises(mukv.StoreError, match=r"frame block 2 of the batch ends \(frame 1\) before it starts \(frame 2\)"):
        b.add(blocks)
    short = synth_blocks("frame", 0, 4)
    short.frame_end = short.frame_end[:3]
    with pytest.raises(mukv.StoreError, match=r"frame_start and frame_end of shape \[4\]"):
        b.add(short)
    assert b.count("frame") == 0
    b.add(synth_blocks("frame", 0, 4))
    assert b.count("frame") == 4
    b.close()


def test_full_disk_loses_nothing_committed(tmp_path, monkeypatch):
    path = tmp_path / "st"
    b = backend(path)
    fill(b)
    b.set_state("frames_seen", 8)
    b.flush()
    committed = {lv: b.count(lv) for lv in ("patch", "frame", "segment")}

    def full(self, level, first, rows, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(KVArchive, "write", full)
    fill(b)  # accepted: the write happens in the background ...
    b.set_state("frames_seen", 16)
    with pytest.raises(mukv.StoreError, match="disk full") as err:
        b.flush()  # ... and its failure surfaces at the next call that waits for it
    assert "intact" in str(err.value) and "Not stored" in str(err.value)
    with pytest.raises(mukv.StoreError, match="disk full"):
        fill(b)
    assert {lv: b.count(lv) for lv in committed} == committed  # the failed batches are not visible
    b.close()
    monkeypatch.undo()
    again = backend(path)
    assert {lv: again.count(lv) for lv in committed} == committed
    assert again.get_state("frames_seen") == 8
    assert again.verify()["ok"]
    for lv, n in committed.items():
        assert torch.equal(again.load_kv(lv, torch.arange(n)), expected_kv(lv, range(n)))
    again.close()


def test_full_disk_checked_before_accepting(tmp_path, monkeypatch):
    b = backend(tmp_path / "st", min_free_bytes=1 << 62)
    with pytest.raises(mukv.StoreError, match="disk full.*nothing of it was stored"):
        b.add(synth_blocks("patch", 0, 1))
    assert b.count("patch") == 0
    b.close()


def test_reader_in_process_beside_writer(tmp_path):
    w = backend(tmp_path / "st")
    fill(w)
    w.set_state("frames_seen", 8)
    w.flush()
    with pytest.warns(UserWarning, match="read-only"):
        r = backend(tmp_path / "st")
    assert r.read_only
    assert r.count("patch") == w.count("patch")
    with pytest.raises(mukv.StoreError, match="read-only"):
        r.add(synth_blocks("patch", 0, 1))
    with pytest.raises(mukv.StoreError, match="being written"):
        backend(tmp_path / "st", read_only=False)
    fill(w)
    w.set_state("frames_seen", 16)
    w.flush()
    n = r.count("patch")
    assert torch.equal(r.load_kv("patch", torch.arange(n)), expected_kv("patch", range(n)))
    r.refresh()
    assert r.count("patch") == w.count("patch") > n
    ids, _ = r.search("patch", torch.randn(LAYOUT.vector_dim), 5)
    assert len(ids) == 5
    r.close()
    w.close()


WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {here!r})
    from disk_synth import LAYOUT, synth_blocks
    from mukv.backends.disk import TieredBackend
    b = TieredBackend(LAYOUT, {path!r}, "cpu", stream_id="live", commit_interval=0.01)
    for step in range(16):
        for level, w in (("patch", 1), ("frame", 1), ("segment", 1)):
            b.add(synth_blocks(level, b.count(level), w))
        b.set_state("step", step)
        b.flush()
        print("flushed", step, flush=True)
        sys.stdin.readline()  # the reader has opened the store: ingest the next step while it reads
    b.close()
""")


def test_reader_process_while_writer_process_ingests(tmp_path):
    path = str(tmp_path / "st")
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(here=str(HERE), path=path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("flushed")
        seen = []
        for _ in range(5):
            with pytest.warns(UserWarning, match="read-only"):
                r = TieredBackend(LAYOUT, path, "cpu", stream_id="live")
            proc.stdin.write("go\n")
            proc.stdin.flush()
            n = r.count("segment")
            assert n >= 1
            # everything the reader sees is complete and intact, though the writer goes on
            for level in ("patch", "frame", "segment"):
                m = r.count(level)
                assert torch.equal(r.load_kv(level, torch.arange(m)), expected_kv(level, range(m)))
            seen.append(n)
            r.close()
            assert proc.stdout.readline().startswith("flushed")
        proc.stdin.write("go\n" * 20)
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
        assert seen == sorted(seen) and seen[-1] > seen[0]
    finally:
        proc.kill()
    final = TieredBackend(LAYOUT, path, "cpu", stream_id="live")
    assert final.count("segment") == 16 and final.get_state("step") == 15
    assert final.verify()["ok"]
    final.close()


def test_state_file_is_plain_json(tmp_path):
    b = backend(tmp_path / "st", stream_id="cam.1")
    fill(b)
    b.commit({"frames_seen": 4, "cursors": {"patch": 3}, "last_time": 6.0})
    b.close()
    state = json.loads((tmp_path / "st" / "streams" / "cam.1.json").read_text())
    assert state["counts"] == {"patch": 12, "frame": 3, "segment": 2}
    assert state["values"]["cursors"] == {"patch": 3} and state["txn"] >= 1
    manifest = json.loads((tmp_path / "st" / "mukv.json").read_text())
    assert manifest["layout"]["dtype"] == "bfloat16"
