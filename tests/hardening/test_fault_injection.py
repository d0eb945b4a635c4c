"""Faults injected into the disk tier (issue 7, part 2), beyond tests/disk/test_disk_faults.py.

Each test damages a store in one way and checks that mukv (1) reports it as a
:class:`mukv.StoreError` naming the file, stream, level and blocks, never a raw
library error, (2) keeps every undamaged block readable, and (3) that
:func:`mukv.backends.disk.verify_store` lists exactly what is damaged. Faults:
I/O errors on KV writes, index writes, state writes and KV reads; a real full
disk (a small tmpfs, where mounting is allowed); a truncated zarr shard; flipped
bytes in a shard; a deleted lancedb data file; a deleted or garbled manifest,
state file and array metadata; and a store copied while it was being written.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import mukv
from hardening_helpers import FAST, assert_clear_error, frames, tree_digest

pytest.importorskip("lancedb")
zarr = pytest.importorskip("zarr")

from disk_synth import LAYOUT, expected_kv, synth_blocks  # noqa: E402
from mukv.backends.disk import TieredBackend, verify_store  # noqa: E402

LEVELS = ("patch", "frame", "segment")
#: small shards (4 segment blocks, 16 frame blocks ...), so damage to one shard spares the others
SMALL = {"commit_interval": 0.0, "shard_bytes": 4 * 2 * 2 * 2 * 9 * 8 * 2, "hot_bytes": 0}


def backend(path, **opts):
    return TieredBackend(LAYOUT, str(path), "cpu", stream_id="s", **{**SMALL, **opts})


def fill(b, rounds=3, windows=2):
    """``rounds`` commits of ``windows`` windows per level; returns the ids of each commit per level."""
    commits = []
    for _ in range(rounds):
        ids = {}
        for lv in LEVELS:
            first = b.count(lv)
            b.add(synth_blocks(lv, first, windows))
            ids[lv] = list(range(first, b.count(lv)))
        b.set_state("rounds", len(commits) + 1)
        b.flush()
        commits.append(ids)
    return commits


def counts(b):
    return {lv: b.count(lv) for lv in LEVELS}


def intact(b, level, ids):
    return torch.equal(b.load_kv(level, torch.tensor(ids)), expected_kv(level, ids))


def shard_files(store, level):
    root = Path(store) / "kv" / "s" / f"{level}.zarr" / "c"
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path):
    """A committed store: 3 commits of 2 windows per level (24 patch, 6 frame, 6 segment blocks)."""
    path = tmp_path / "st"
    b = backend(path)
    commits = fill(b)
    total = counts(b)
    b.close()
    return path, commits, total


# ------------------------------------------------------------------------------ I/O errors
def test_eio_writing_kv_keeps_committed_and_reads_go_on(store, monkeypatch):
    path, _, total = store
    b = backend(path)

    async def eio(self, key, value, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(zarr.storage.LocalStore, "set", eio)
    with pytest.raises(mukv.StoreError) as err:
        fill(b, rounds=1)
    assert_clear_error(err.value)
    assert "I/O error" in str(err.value) and "intact" in str(err.value)
    monkeypatch.undo()
    assert counts(b) == total  # nothing half-stored is visible
    ids, _ = b.search("segment", torch.randn(LAYOUT.vector_dim), 3)  # and questions go on (no hot tier here)
    assert len(ids) == 3 and intact(b, "segment", ids.tolist())
    with pytest.raises(mukv.StoreError, match="reopen"):
        b.add(synth_blocks("frame", b.count("frame"), 1))
    b.close()
    again = backend(path)
    assert counts(again) == total and again.get_state("rounds") == 3
    assert again.verify()["ok"] and verify_store(str(path)).ok
    fill(again, rounds=1)  # and writing goes on after a reopen
    again.close()


def test_index_write_failure_is_reported_as_disk_full(store, monkeypatch):
    """lancedb reports a full disk as a RuntimeError; it reaches the caller as a StoreError saying so."""
    from lancedb.table import LanceTable

    path, _, total = store
    b = backend(path)

    def full(self, *args, **kwargs):
        raise RuntimeError("lance error: IO error: No space left on device (os error 28)")

    monkeypatch.setattr(LanceTable, "add", full)
    with pytest.raises(mukv.StoreError, match="disk full") as err:
        fill(b, rounds=1)
    assert_clear_error(err.value)
    monkeypatch.undo()
    b.close()
    rep = verify_store(str(path))  # the KV of the failed commit is on disk, beyond the committed counts
    assert rep.ok and {p.kind for p in rep.problems} == {"orphan_kv"}, rep.summary()
    again = backend(path)
    assert counts(again) == total and sum(again.recovered["kv_rows"].values()) > 0
    again.close()
    assert verify_store(str(path)).problems == []  # the writer's recovery removed the leftovers


def test_a_hung_lance_call_is_an_error_not_a_frozen_stream(store, monkeypatch):
    """lance deadlocked once under load (docs/hardening.md): a search or a write that never returns
    becomes a StoreError after ``lance_call_timeout``, and what was committed stays readable."""
    from lancedb.table import LanceTable

    from mukv.backends.disk.lance_index import BlockTable

    path, _, total = store
    release = threading.Event()
    b = backend(path, lance_call_timeout=0.3)

    def hang(self, *args, **kwargs):
        release.wait(30)
        raise RuntimeError("released")

    monkeypatch.setattr(BlockTable, "_query", staticmethod(lambda *a: hang(None)))  # every read of rows
    with pytest.raises(mukv.StoreError) as err:  # not the "released" error: it gave up waiting first
        b.search("segment", torch.randn(LAYOUT.vector_dim), 3)
    assert_clear_error(err.value)
    assert "did not finish searching segment blocks of stream 's' within 0.3 s" in str(err.value)
    assert "lance_call_timeout" in str(err.value)
    monkeypatch.setattr(LanceTable, "add", hang)
    with pytest.raises(mukv.StoreError, match="did not finish writing index rows"):
        fill(b, rounds=1)
    release.set()
    monkeypatch.undo()
    b.close()
    again = backend(path)
    assert counts(again) == total and verify_store(str(path)).ok
    ids, _ = again.search("segment", torch.randn(LAYOUT.vector_dim), 3)
    assert intact(again, "segment", ids.tolist())
    again.close()
    with pytest.raises(mukv.ConfigError, match="lance_call_timeout"):
        backend(path, lance_call_timeout=0)


def test_state_file_write_failure(store, monkeypatch):
    from mukv.backends.disk.files import Files

    path, _, total = store
    b = backend(path)
    real = Files.write

    def eio(self, rel, data):
        if rel.startswith("streams/"):
            raise OSError(errno.EIO, "Input/output error")
        return real(self, rel, data)

    monkeypatch.setattr(Files, "write", eio)
    with pytest.raises(mukv.StoreError) as err:
        fill(b, rounds=1)
    assert_clear_error(err.value)
    monkeypatch.undo()
    b.close()
    rep = verify_store(str(path))  # KV and rows of the round are there, but no state counts them
    assert rep.ok and {"orphan_rows", "orphan_kv"} <= {p.kind for p in rep.problems}
    again = backend(path)
    assert counts(again) == total and again.get_state("rounds") == 3
    again.close()


@pytest.mark.parametrize("reader", ["direct", "zarr"])
def test_eio_reading_kv_names_the_blocks(store, monkeypatch, reader):
    """An I/O error reading KV, on the direct shard reader of local stores and on zarr's (object stores)."""
    from mukv.backends.disk import shards

    path, _, total = store
    b = backend(path)

    def eio_sync(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    async def eio(self, *args, **kwargs):
        eio_sync()

    if reader == "direct":
        assert b.archive.geometry("frame") is not None
        monkeypatch.setattr(shards, "_read_piece", eio_sync)
    else:
        b.archive.direct = False
        monkeypatch.setattr(zarr.storage.LocalStore, "get", eio)
    with pytest.raises(mukv.StoreError, match=r"cannot read KV of frame blocks 1-2 \(I/O error") as err:
        b.load_kv("frame", torch.tensor([2, 1]))
    assert_clear_error(err.value)
    monkeypatch.undo()
    assert intact(b, "frame", [2, 1])
    b.close()


def test_a_real_full_disk(tiny_model, tmp_path):
    """A 3 MB tmpfs fills up under a Session: the feed fails saying so, questions go on over what was
    committed, and a copy of the store on a roomy disk opens, recovers and continues."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        s = mukv.Session(model=tiny_model, backend="lancedb", path=mnt / "st", config=FAST,
                         backend_options={"commit_interval": 0.0, "hot_bytes": 256 << 10, "hot_slab_bytes": 32 << 10})
        err = None
        for i in range(200):
            try:
                s.feed(frames(4, seed=i))
                s.backend.flush()
            except mukv.MukvError as exc:
                err = exc
                break
        assert err is not None and "disk full" in str(err), err
        assert_clear_error(err)
        answer = s.ask("what color was the car?")
        assert answer.blocks
        committed = dict(s.backend._committed)
        with pytest.raises(mukv.StoreError, match="disk full"):
            s.close()  # closing says again what was not stored
        assert verify_store(str(mnt / "st")).ok
        copy = tmp_path / "copy"
        shutil.copytree(mnt / "st", copy, ignore=shutil.ignore_patterns("*.lock"))
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)  # busy: detach it anyway
    again = mukv.Session.open(copy, model=tiny_model, backend_options={"commit_interval": 0.0})
    for lv, n in again.backend._committed.items():
        assert n <= committed[lv]
    assert again.backend.verify()["ok"]
    again.feed(frames(4, seed=1000))
    again.ask("what color was the car?")
    again.close()
    assert verify_store(str(copy)).ok


# ------------------------------------------------------------------------------ damaged files
def test_truncated_zarr_shard(store):
    path, _, total = store
    shards = shard_files(path, "segment")
    assert len(shards) >= 2
    victim = shards[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    rep = verify_store(str(path))
    assert not rep.ok
    [p] = rep.damage
    assert p.kind == "unreadable_kv" and p.level == "segment" and p.blocks == (0, 1, 2, 3), rep.summary()
    assert rep.streams["s"]["segment"]["verified"] == total["segment"] - 4
    assert rep.streams["s"]["frame"]["verified"] == total["frame"]
    b = backend(path)  # the store still opens for writing
    with pytest.raises(mukv.StoreError, match=r"cannot read KV of segment blocks 1 \(of 1, 5 asked for\).*mukv inspect --verify") as err:
        b.load_kv("segment", torch.tensor([1, 5]))
    assert_clear_error(err.value)
    assert intact(b, "segment", [4, 5]) and intact(b, "frame", list(range(total["frame"])))
    assert not b.verify()["ok"] and b.verify()["levels"]["segment"]["unreadable"] == [0, 1, 2, 3]
    fill(b, rounds=1)  # new blocks go to new shards
    assert intact(b, "segment", list(range(total["segment"], b.count("segment"))))
    b.close()


def test_flipped_bytes_fail_the_checksum(store):
    path, _, _ = store
    victim = shard_files(path, "frame")[0]
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF  # inside block 0 (shards here are uncompressed)
    victim.write_bytes(bytes(data))
    rep = verify_store(str(path))
    [p] = rep.damage
    assert p.kind == "corrupt_kv" and p.blocks == (0,), rep.summary()
    b = backend(path, read_only=True)
    with pytest.raises(mukv.StoreError, match=r"frame blocks \[0\].*checksum"):
        b.load_kv("frame", torch.tensor([0, 1]))
    assert intact(b, "frame", [1, 2, 3])
    b.close()


def test_deleted_lancedb_fragment(tmp_path):
    path = tmp_path / "st"
    b = backend(path, commit_interval=3600.0)  # the writer commits at flush only: one data file per round
    commits = fill(b)
    total = counts(b)
    b.close()
    data = sorted((Path(path) / "index" / "blocks.lance" / "data").glob("*.lance"), key=os.path.getmtime)
    assert len(data) == len(commits)
    before = tree_digest(path)
    data[1].unlink()  # the rows of the second round
    rep = verify_store(str(path))
    assert not rep.ok
    kinds = {p.kind for p in rep.damage}
    assert {"index", "index_fragment", "missing_rows"} <= kinds, rep.summary()
    lost = {p.level: list(p.blocks) for p in rep.damage if p.kind == "missing_rows"}
    assert lost == commits[1], rep.summary()  # exactly the blocks of the lost file
    for lv in LEVELS:
        assert rep.streams["s"][lv]["verified"] == total[lv] - len(commits[1][lv])
    with pytest.raises(mukv.StoreError, match="mukv inspect --verify") as err:
        backend(path)  # a writer's recovery cannot read the index
    assert_clear_error(err.value)
    r = backend(path, read_only=True)
    with pytest.raises(mukv.StoreError, match="lancedb index error while searching") as err:
        r.search("patch", torch.randn(LAYOUT.vector_dim), 3)
    assert_clear_error(err.value)
    r.close()
    after = tree_digest(path)
    assert {k: v for k, v in after.items() if not k.endswith(".lock")} == \
        {k: v for k, v in before.items() if k != str(data[1].relative_to(path)) and not k.endswith(".lock")}


@pytest.mark.parametrize("damage", ["no manifest", "bad manifest", "no state", "bad state", "no array meta",
                                    "short array"])
def test_damaged_small_files(store, damage, tiny_model):
    path, _, total = store
    p = Path(path)
    if damage == "no manifest":
        (p / "mukv.json").unlink()
    elif damage == "bad manifest":
        (p / "mukv.json").write_text('{"format": "mukv-store", "format_version": 1, "layout": {"num_layers": "x"}}')
    elif damage == "no state":
        (p / "streams" / "s.json").unlink()
    elif damage == "bad state":
        (p / "streams" / "s.json").write_text("{trunc")
    elif damage == "no array meta":
        (p / "kv" / "s" / "frame.zarr" / "zarr.json").unlink()
    elif damage == "short array":
        meta = json.loads((p / "kv" / "s" / "frame.zarr" / "zarr.json").read_text())
        meta["shape"][0] = 2
        (p / "kv" / "s" / "frame.zarr" / "zarr.json").write_text(json.dumps(meta))
    rep = verify_store(str(path))
    if damage == "no state":  # the stream is gone from the store's point of view: its data is left over
        assert rep.ok and {"unknown_stream", "orphan_kv"} <= {q.kind for q in rep.problems}, rep.summary()
    else:
        assert not rep.ok, rep.summary()
        assert rep.damage[0].message
    try:
        b = backend(path)
    except mukv.StoreError as exc:
        assert_clear_error(exc)
    else:
        if damage in ("no array meta", "short array"):
            with pytest.raises(mukv.StoreError):
                b.load_kv("frame", torch.arange(total["frame"]))
        b.close()


# ------------------------------------------------------------------------------ a copy of a live store
def _copy_file(a, b):
    try:
        shutil.copy2(a, b)
    except FileNotFoundError:  # a temp file renamed away meanwhile (rsync: "file vanished")
        pass


def _copy(src: Path, dst: Path, order: list[str]) -> None:
    """Copy a live store, top-level entries in ``order``, as a plain file copy would."""
    dst.mkdir()
    for name in order:
        s = src / name
        if s.is_dir():
            shutil.copytree(s, dst / name, ignore=shutil.ignore_patterns("*.lock"), copy_function=_copy_file)
        elif s.exists():
            _copy_file(s, dst / name)


def test_store_copied_while_being_written(tmp_path):
    """Copies of a store taken at random moments of a busy writer. Copied in the order
    mukv.json, streams/, kv/, index/ (state before data: the writer commits data before state),
    every copy opens, recovers and holds every block its state counts, intact. Copied in another
    order, a copy may count blocks it lacks: verify_store says which, opening it for writing
    refuses with a StoreError, and every block it does hold reads back intact."""
    src = tmp_path / "live"
    b = TieredBackend(LAYOUT, str(src), "cpu", stream_id="s", commit_interval=0.01, shard_bytes=8192,
                      hot_bytes=64 << 10)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer():
        rng = random.Random(3)
        try:
            while not stop.is_set():
                for lv in LEVELS:
                    b.add(synth_blocks(lv, b.count(lv), rng.randint(1, 2)))
                b.set_state("counts", counts(b))
                if rng.random() < 0.2:
                    b.flush()
                time.sleep(0.01)  # a camera's pace, not a benchmark's: the store stays small enough to copy
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    rng = random.Random(5)
    results = {"safe": [], "other": []}
    try:
        for i in range(6):
            time.sleep(rng.uniform(0.02, 0.15))
            safe = i % 2 == 0
            dst = tmp_path / f"copy{i}"
            _copy(src, dst, ["mukv.json", "streams", "kv", "index"] if safe
                  else ["mukv.json", "index", "kv", "streams"])
            rep = verify_store(str(dst))
            assert all(p.severity in ("damage", "leftover", "note") for p in rep.problems)
            try:
                w = TieredBackend(LAYOUT, str(dst), "cpu", stream_id="s")
            except mukv.StoreError as exc:
                assert_clear_error(exc)
                assert not safe, f"a copy taken state-first did not open: {exc}"
                assert not rep.ok  # verify saw it too
                results["other"].append("refused")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = TieredBackend(LAYOUT, str(dst), "cpu", stream_id="s", read_only=True)
                for lv in LEVELS:  # what the copy holds is intact
                    ok = [i for i in range(r.count(lv)) if i not in rep.streams["s"].get(lv, {}).get("missing", [])
                          and i not in rep.streams["s"].get(lv, {}).get("unreadable", [])]
                    good = [i for i in ok if i < min(r.archive.length(lv), r.count(lv))]
                    if good:
                        data = r.archive.read(lv, np.array(good))
                        from mukv.backends.disk.zarr_kv import from_numpy

                        assert torch.equal(from_numpy(data, LAYOUT.dtype), expected_kv(lv, good))
                r.close()
                continue
            n = counts(w)
            assert w.verify()["ok"]
            for lv in LEVELS:
                if n[lv]:
                    assert intact(w, lv, list(range(n[lv])))
            w.close()
            assert verify_store(str(dst)).problems == []
            results["safe" if safe else "other"].append(sum(n.values()))
    finally:
        stop.set()
        t.join()
        b.close()
    assert not errors, errors
    assert len(results["safe"]) == 3 and max(results["safe"]) > 0
    print(f"copies of a live store: state first {results['safe']} blocks, each opened intact; "
          f"other order {results['other']}")


def test_sessions_creating_one_store_at_once(tmp_path):
    """Streams of one new store opened by several threads at the same moment (found by the soak
    benchmark: a second creator saw the first one's temp manifest and refused a "folder of other files")."""
    for trial in range(4):
        path = tmp_path / f"st{trial}"
        made, errors = [], []

        def open_stream(i):
            try:
                made.append(TieredBackend(LAYOUT, str(path), "cpu", stream_id=f"cam-{i}"))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=open_stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for b in made:
            b.add(synth_blocks("frame", 0, 1))
            b.close()
        assert not errors, errors
        assert verify_store(str(path)).ok


def test_verify_store_report_forms(store, capsys):
    from mukv.backends.disk.verify import main

    path, _, total = store
    rep = verify_store(str(path), stream_id="s", check_kv=False)
    assert rep.ok and rep.streams["s"]["frame"]["blocks"] == total["frame"]
    assert main([str(path)]) == 0 and "OK" in capsys.readouterr().out
    assert main([str(path), "--json"]) == 0 and json.loads(capsys.readouterr().out)["ok"] is True
    assert main([str(path / "nothing")]) == 1 and "DAMAGED" in capsys.readouterr().out
    with pytest.raises(mukv.StoreError, match="invalid stream id"):
        verify_store(str(path), stream_id="../s")
    assert not verify_store(str(path), stream_id="other").ok  # no such stream


def test_streams_committing_their_first_blocks_at_once(tmp_path):
    """The first commit of several streams of a new store at the same moment (found by the soak
    benchmark: the second writer to create the shared lancedb table failed with "already exists")."""
    for trial in range(4):
        path = tmp_path / f"st{trial}"
        backends = [TieredBackend(LAYOUT, str(path), "cpu", stream_id=f"cam-{i}", commit_interval=3600.0)
                    for i in range(4)]
        for b in backends:
            b.add(synth_blocks("frame", 0, 2))
        barrier = threading.Barrier(len(backends))
        errors = []

        def commit(b):
            try:
                barrier.wait()
                b.flush()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=commit, args=(b,)) for b in backends]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for b in backends:
            b.close()
        assert not errors, errors
        rep = verify_store(str(path))
        assert rep.ok and all(rep.streams[f"cam-{i}"]["frame"]["verified"] == 2 for i in range(4)), rep.summary()


def test_reader_reads_blocks_committed_after_refresh(store):
    path, _, total = store
    w = backend(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = backend(path, read_only=True)
    assert intact(r, "frame", list(range(total["frame"])))  # opens the arrays at their length now
    fill(w, rounds=1)
    r.refresh()
    n = r.count("frame")
    assert n > total["frame"] and intact(r, "frame", list(range(n)))  # the new blocks read back
    r.close()
    w.close()


def test_a_new_writer_over_leftovers_of_a_stream_without_state_leaves_no_orphan(tmp_path):
    """KV of a stream whose state file is gone (a writer killed before its first commit, a copy taken
    before the state was written): a writer of that id removes it, whether it commits or not."""
    for commit in (False, True):
        src = tmp_path / f"st{int(commit)}"
        b = TieredBackend(LAYOUT, str(src), "cpu", stream_id="s", shard_bytes=8192)
        b.add(synth_blocks("patch", 0, 2))
        b.set_state("counts", {"patch": b.count("patch")})
        b.flush()
        b.close()
        (src / "streams" / "s.json").unlink()
        assert any(p.severity == "leftover" for p in verify_store(str(src)).problems)
        w = TieredBackend(LAYOUT, str(src), "cpu", stream_id="s")
        assert all(w.count(lv) == 0 for lv in LEVELS)
        if commit:
            w.add(synth_blocks("patch", 0, 1))
            w.flush()
            assert intact(w, "patch", [0])
        w.close()
        assert verify_store(str(src)).problems == []
