"""A store tells the truth or says it does not (issue 15, cases 3, 4, 5, 7, 9): validated files, no silent
"repair", verify checks meaning, one writer and many readers, streams as units."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
import torch

import mukv
import mukv.streams as ms
from integrity_helpers import FAST, frames, state
from mukv.backends.disk import verify_store
from mukv.errors import StoreError


def digest(root) -> dict:
    """Every file of a store and its bytes (lock files aside)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.endswith(".lock"):
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


@pytest.fixture
def store(tiny_model, tmp_path):
    path = tmp_path / "s.mukv"
    with mukv.Session(model=tiny_model, backend="lancedb", path=path, config=FAST) as s:
        s.feed(frames(6))
    return path


def kinds(report) -> set[str]:
    return {p.kind for p in report.damage}


# -- case 5: a garbled state file is refused, never read as something else -------------------------------------
@pytest.mark.parametrize("garble", [
    lambda st: st["counts"].__setitem__("frame", 3.7),
    lambda st: st["counts"].__setitem__("frame", "6"),
    lambda st: st["counts"].__setitem__("frame", True),
    lambda st: st["counts"].__setitem__("frame", -1),
    lambda st: st["values"].__setitem__("frames_seen", 6.0),
    lambda st: st["values"]["cursors"].__setitem__("frame", 99),
    lambda st: st["values"].__setitem__("last_time", "late"),
    lambda st: st.__setitem__("txn", None),
    lambda st: st["levels"]["frame"].__setitem__("block_shape", [1, 2, 3]),
    lambda st: st.__setitem__("stream_id", "other"),
    lambda st: st["values"].__setitem__("first_time", st["values"]["last_time"] + 1.0),
], ids=["float", "string", "bool", "negative", "frames_float", "cursor_past", "time_text", "txn_null", "shape",
        "other_id", "first_after_last"])
def test_a_garbled_state_file_is_refused_and_reported(tiny_model, store, garble):
    st = state(store)
    garble(st)
    (store / "streams" / "default.json").write_text(json.dumps(st))
    before = digest(store)
    with pytest.raises(StoreError, match="invalid stream state"):
        mukv.Session.open(store, model=tiny_model)
    with pytest.raises(StoreError, match="invalid stream state"):
        mukv.Session.open(store, model=tiny_model, read_only=True)
    report = verify_store(str(store))
    assert not report.ok and "state" in kinds(report)
    assert digest(store) == before  # nothing deleted as "leftovers"


def test_repair_gives_a_first_time_after_the_last_one_the_earliest_blocks(tiny_model, store):
    st = state(store)
    st["values"]["first_time"] = st["values"]["last_time"] + 1.0
    (store / "streams" / "default.json").write_text(json.dumps(st))
    plan = ms.repair(str(store), apply=True)
    assert any("first time" in a for a in plan.streams[0].actions), plan.summary()
    assert verify_store(str(store)).ok
    assert state(store)["values"]["first_time"] == 0.0  # frames(6) fed at the default times from 0
    with mukv.Session.open(store, model=tiny_model) as s:
        s.feed(frames(2, seed=1))
    assert verify_store(str(store)).ok


def _damage_pending(path, how: str) -> dict:
    """Damage the pending frames file the state names (``missing``, ``checksum``, ``size``: the state's
    CRC-32 made to agree with a shortened file); returns the state's pending record."""
    import zlib

    st = state(path)
    p = st["values"]["pending"]
    f = path / "streams" / "default" / p["file"]
    if how == "missing":
        f.unlink()
    elif how == "checksum":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))
    else:
        data = f.read_bytes()[:-4]
        f.write_bytes(data)
        st["values"]["pending"]["crc32"] = zlib.crc32(data) & 0xFFFFFFFF
        (path / "streams" / "default.json").write_text(json.dumps(st))
    return p


@pytest.mark.parametrize("how, words", [("missing", "is missing"), ("checksum", "fails its checksum"),
                                        ("size", "has the wrong size")])
def test_a_damaged_pending_frames_file_is_reported_refused_on_import_and_repaired(tiny_model, tmp_path, how, words):
    # once unchecked: verify said OK and an import took the copy, while reopening dropped those frames
    path = tmp_path / "p.mukv"
    with mukv.Session(model=tiny_model, backend="lancedb", path=path, config=FAST) as s:
        s.feed(frames(7))  # segments of 2 frames: frame 6 waits in the pending file
    with mukv.Session(model=tiny_model, backend="lancedb", path=tmp_path / "dst.mukv", config=FAST) as s:
        s.feed(frames(2))
    p = _damage_pending(path, how)
    assert p["start"] == 6 and p["count"] == 1
    report = verify_store(str(path))
    assert kinds(report) == {"pending_frames"}, report.summary()
    assert words in report.damage[0].message and "frames 6..6" in report.damage[0].message
    dst_before = digest(tmp_path / "dst.mukv")
    with pytest.raises(StoreError, match="pending frames file"):
        ms.import_stream(str(tmp_path / "dst.mukv"), str(path), stream_id="copy")
    assert digest(tmp_path / "dst.mukv") == dst_before
    before = digest(path)
    plan = ms.repair(str(path))
    assert any("drop the pending frames record" in a and words in a for a in plan.streams[0].actions), plan.summary()
    assert digest(path) == before  # planning changes nothing
    ms.repair(str(path), apply=True)
    assert verify_store(str(path)).ok
    vals = state(path)["values"]
    assert vals["pending"] is None and vals["frames_seen"] == 7 and vals["cursors"]["segment"] == 6
    assert not (path / "streams" / "default" / p["file"]).exists()
    with mukv.Session.open(path, model=tiny_model) as s:
        s.feed(frames(3, seed=1))
    assert verify_store(str(path)).ok


def test_a_state_that_lost_count_of_committed_blocks_refuses_to_open_for_writing(tiny_model, store):
    st = state(store)
    st["counts"]["frame"] = 4  # 6 frame blocks are committed
    (store / "streams" / "default.json").write_text(json.dumps(st))
    before = digest(store)
    with pytest.raises(StoreError, match="disagrees with its data.*mukv repair"):
        mukv.Session.open(store, model=tiny_model)
    assert digest(store) == before
    report = verify_store(str(store))
    assert "uncounted_committed" in kinds(report)
    plan = ms.repair(str(store))
    assert plan.needed and any("count blocks 4..5" in a for a in plan.streams[0].actions)
    assert digest(store) == before  # a plan changes nothing
    done = ms.repair(str(store), apply=True)
    assert done.applied and verify_store(str(store)).ok
    with mukv.Session.open(store, model=tiny_model) as s:
        assert s.backend.count("frame") == 6 and s.stats()["frames"] == 6
        s.feed(frames(2, seed=1))
        assert s.backend.count("frame") == 8


# -- cases 3 and 4: a stream whose blocks repeat frames or go back in time is damaged -----------------------
def _store_with_blocks(tiny_model, path, spans, frames_seen, last_time):
    """A store whose frame level holds blocks of ``spans`` [(frame_start, time)], written straight through the
    backend, as a session with the old bugs once did."""
    with mukv.Session(model=tiny_model, backend="lancedb", path=path, config=FAST) as s:
        s.feed(frames(1))
        b = s.backend
        base = b.load_kv("frame", torch.tensor([0]))
        from mukv.blocks import CompressedBlocks

        n = len(spans)
        fs = torch.tensor([f for f, _ in spans])
        t = torch.tensor([float(x) for _, x in spans], dtype=torch.float64)
        b.add(CompressedBlocks(level="frame", kv=base.expand(n, *base.shape[1:]).clone(),
                               vectors=torch.randn(n, b.layout.vector_dim), kept=torch.zeros(n, base.shape[4], dtype=torch.long),
                               positions=torch.zeros(n, base.shape[4], dtype=torch.long), frame_start=fs, frame_end=fs + 1,
                               t_start=t, t_end=t, token_index=torch.zeros(n, base.shape[4], dtype=torch.long)))
        b.commit({"frames_seen": frames_seen, "cursors": {"frame": frames_seen, "patch": 1, "segment": 0}, "pending": None,
                  "last_time": last_time})


def test_verify_reports_frames_stored_twice_with_other_times(tiny_model, tmp_path):
    # case 4: a fork writing the parent's stream stored times 0,2,4,6,0,2
    path = tmp_path / "a"
    _store_with_blocks(tiny_model, path, [(1, 2.0), (2, 4.0), (3, 6.0), (1, 0.5), (2, 2.5)], 4, 6.0)
    report = verify_store(str(path))
    assert not report.ok and {"overlapping_frames"} <= kinds(report)
    # the repair keeps the true prefix and drops the repeats
    plan = ms.repair(str(path))
    assert any("delete blocks 4..5" in a for a in plan.streams[0].actions), plan.summary()
    ms.repair(str(path), apply=True)
    assert verify_store(str(path)).ok


def test_verify_reports_blocks_the_state_never_counted_frames_for(tiny_model, tmp_path):
    # case 3: Ctrl-C once left frame blocks for 8 frames in a stream that said it saw 4
    path = tmp_path / "b"
    _store_with_blocks(tiny_model, path, [(1, 2.0), (2, 4.0), (3, 6.0), (4, 8.0), (5, 10.0), (6, 12.0), (7, 14.0)],
                       4, 6.0)
    report = verify_store(str(path))
    assert "state_behind_data" in kinds(report)
    ms.repair(str(path), apply=True)
    assert verify_store(str(path)).ok
    assert state(path)["values"]["frames_seen"] == 8


def test_verify_reports_time_going_back_and_frames_with_two_times(tiny_model, tmp_path):
    path = tmp_path / "c"
    _store_with_blocks(tiny_model, path, [(1, 2.0), (2, 1.0), (3, 6.0)], 4, 6.0)
    assert "time_order" in kinds(verify_store(str(path)))


# -- case 9: special files and oversized files are refused without reading them -------------------------------
@pytest.mark.parametrize("which", ["mukv.json", "streams/default.json"])
@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "loop", "huge", "deep"])
def test_special_and_oversized_store_files_are_refused_not_read(tiny_model, store, which, kind):
    target = store / which
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "dev_zero":
        target.symlink_to("/dev/zero")
    elif kind == "loop":
        target.symlink_to(target)
    elif kind == "huge":
        with open(target, "wb") as f:
            f.truncate(200 << 20)  # sparse: 200 MB of zeros
    else:
        target.write_text("[" * 100_000 + "]" * 100_000)
    result: dict = {}

    def run():
        try:
            mukv.Session.open(store, model=tiny_model)
        except StoreError as exc:
            result["open"] = str(exc)
        result["verify"] = verify_store(str(store))

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(60)
    assert not th.is_alive(), "hung"
    assert "open" in result, result
    assert not result["verify"].ok and {"manifest", "state"} & kinds(result["verify"])


def test_a_fifo_stream_source_times_out(tiny_model, tmp_path):
    fifo = tmp_path / "cam"
    os.mkfifo(fifo)
    with mukv.Session(model=tiny_model, config=FAST) as s:
        t0 = time.monotonic()
        with pytest.raises(mukv.InputError, match="timeout_s"):
            s.feed_from("stream", str(fifo), timeout_s=1)
        assert time.monotonic() - t0 < 30
        assert s.stats()["frames"] == 0


def test_a_checkpoint_config_that_is_a_fifo_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    os.mkfifo(ckpt / "config.json")
    with pytest.raises(StoreError, match="not a regular file"):
        mukv.Session(model=str(ckpt))


# -- case 7: one writer, many readers ----------------------------------------------------------------------
def test_readers_never_block_the_writer(tiny_model, store):
    r1 = mukv.Session.open(store, model=tiny_model, read_only=True)
    r2 = mukv.Session.open(store, model=tiny_model, read_only=True)
    w = mukv.Session.open(store, model=tiny_model)  # opens although two readers are open
    with pytest.raises(StoreError, match="pid"):
        mukv.Session.open(store, model=tiny_model)  # a second writer names the first
    with pytest.raises(StoreError, match="read-only"):
        r1.feed(frames(1))
    w.feed(frames(2, seed=3))
    w.flush()
    assert r1.stats()["frames"] == 6
    a = r1.ask("what?")  # refreshes first: sees the writer's commits
    assert r1.stats()["frames"] == 8 and a.blocks
    assert r2.refresh() and r2.stats()["frames"] == 8
    for s in (r1, r2, w):
        s.close()
    with pytest.raises(StoreError, match="no mukv stream 'nope'; streams: default"):
        mukv.Session.open(store, stream_id="nope", model=tiny_model, read_only=True)


def test_a_dead_writers_lock_is_reclaimed(tiny_model, store):
    import subprocess
    import sys

    code = ("import mukv, sys, time\n"
            f"s = mukv.Session.open({str(store)!r}, model='tiny-llava-ov')\n"
            "print('open', flush=True)\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "open"
    with pytest.raises(StoreError, match=f"pid {child.pid}"):
        mukv.Session.open(store, model=tiny_model)
    child.kill()
    child.wait()
    with mukv.Session.open(store, model=tiny_model) as s:
        assert s.stats()["frames"] == 6


# -- stream management ---------------------------------------------------------------------------------------
def test_streams_list_delete_export_import(tiny_model, store, tmp_path):
    with mukv.Session(model=tiny_model, backend="lancedb", path=store, stream_id="cam2", config=FAST,
                      wall_origin="2026-12-06T08:00:00Z") as s:
        s.feed(frames(4, seed=2))
    got = {x["id"]: x for x in ms.list_streams(str(store))}
    assert set(got) == {"default", "cam2"}
    assert got["cam2"]["frames"] == 4 and got["cam2"]["wall_start"] == "2026-12-06T08:00:00.000Z"
    assert got["cam2"]["wall_end"] == "2026-12-06T08:00:06.000Z" and got["cam2"]["bytes"] > 0
    assert got["default"]["wall_start"] is None and got["default"]["t_end"] == 10.0
    with pytest.raises(StoreError, match="no stream 'cam9'; streams: cam2, default"):
        ms.delete_stream(str(store), "cam9")
    exported = ms.export_stream(str(store), "cam2", str(tmp_path / "cam2.export"))
    assert exported["frames"] == 4 and verify_store(str(tmp_path / "cam2.export")).ok
    with pytest.raises(StoreError, match="already a mukv store"):
        ms.export_stream(str(store), "cam2", str(tmp_path / "cam2.export"))
    kv_before = sum(p.stat().st_size for p in (store / "kv").rglob("*") if p.is_file())
    out = ms.delete_stream(str(store), "cam2")
    assert out["blocks"]["frame"] == 4 and out["index_rows"] > 0
    assert not (store / "kv" / "cam2").exists() and not (store / "streams" / "cam2.json").exists()
    assert sum(p.stat().st_size for p in (store / "kv").rglob("*") if p.is_file()) < kv_before
    assert [x["id"] for x in ms.list_streams(str(store))] == ["default"] and verify_store(str(store)).ok
    ms.import_stream(str(store), str(tmp_path / "cam2.export"), stream_id="cam2b")
    with pytest.raises(StoreError, match="exists"):
        ms.import_stream(str(store), str(tmp_path / "cam2.export"), stream_id="cam2b")
    with mukv.Session.open(store, stream_id="cam2b", model=tiny_model) as s:
        assert s.stats()["frames"] == 4 and s.wall_origin is not None
        s.feed(frames(2, seed=7))  # an imported stream goes on
    assert verify_store(str(store)).ok
    # a damaged export is refused, and nothing of it is taken in
    for shard in (p for p in (tmp_path / "cam2.export" / "kv").rglob("*") if p.is_file() and "/c/" in str(p)):
        data = bytearray(shard.read_bytes())
        data[64] ^= 0xFF  # inside the first block's KV
        shard.write_bytes(bytes(data))
    before = digest(store)
    with pytest.raises(StoreError, match="does not verify"):
        ms.import_stream(str(store), str(tmp_path / "cam2.export"), stream_id="cam2c")
    assert digest(store) == before


def test_a_stream_being_written_cannot_be_deleted(tiny_model, store):
    with mukv.Session.open(store, model=tiny_model):
        with pytest.raises(StoreError, match="being written"):
            ms.delete_stream(str(store), "default")
    ms.delete_stream(str(store), "default")
    assert ms.list_streams(str(store)) == []


def test_export_and_import_where_no_folder_can_be_made_are_store_errors(store, tmp_path):
    # once raw FileNotFoundError / NotADirectoryError from mkdir
    (tmp_path / "a-file").write_text("x")
    before = digest(store)
    for dest in (tmp_path / "a-file" / "export", "/proc/mukv-none/export"):
        with pytest.raises(StoreError):
            ms.export_stream(str(store), "default", str(dest))
        with pytest.raises(StoreError):
            ms.import_stream(str(dest), str(store), stream_id="copy")
    assert digest(store) == before


def test_verify_does_not_call_a_pending_file_a_writer_replaced_meanwhile_damage(tiny_model, tmp_path):
    # verify reads the state, then the file it names; a writer committing in between names a newer file and
    # removes the old one: that is no damage
    from mukv.backends.disk.files import Files
    from mukv.backends.disk.verify import VerifyReport, _check_pending, _read_states

    path = tmp_path / "p.mukv"
    with mukv.Session(model=tiny_model, backend="lancedb", path=path, config=FAST) as s:
        s.feed(frames(7))
        s.flush()
        files = Files(str(path))
        layout = json.loads((path / "mukv.json").read_text())["layout"]
        old = _read_states(files, "default", layout, VerifyReport(str(path)))["default"]
        s.feed(frames(2, seed=1))  # frames 7, 8: the pending file of frame 6 goes, frame 8's comes
        s.flush()
    assert old["values"].pending.start == 6 and state(path)["values"]["pending"]["start"] == 8
    assert not (path / "streams" / "default" / old["values"].pending.file).exists()  # the file it names is gone
    report = VerifyReport(str(path))
    _check_pending(files, "default", old, report)
    assert report.problems == []
    assert verify_store(str(path)).ok
