"""KV codecs on the disk tier (issue 20): encoded rows with crc32 over what is stored, arrays of several codecs in
one stream (mixed reads), reopening with another setting, stores written before codecs, recovery, verify_store."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import mukv
from disk_synth import LAYOUT, LEVELS, expected_kv, frames, synth_blocks
from mukv.backends.disk import TieredBackend, verify_store
from mukv.backends.disk.files import Files
from mukv.backends.disk.zarr_kv import KVArchive, to_numpy
from mukv.kvcodec import build_codec

DATA = Path(__file__).resolve().parents[1] / "data"
HAS_FP8 = hasattr(torch, "float8_e4m3fn")
CODECS = ["none", "int8", "int4", *(["fp8"] if HAS_FP8 else [])]


def backend(path, codec="none", **opts) -> TieredBackend:
    return TieredBackend(LAYOUT, str(path), "cpu", stream_id="s", codec=build_codec(codec),
                         **{"commit_interval": 0.0, **opts})


def fill(b: TieredBackend, windows: int = 2) -> None:
    for level in LEVELS:
        b.add(synth_blocks(level, b.count(level), windows))


def round_trip(codec: str | dict, level: str, ids) -> torch.Tensor:
    c = build_codec(codec)
    return c.decode_blocks(c.encode_blocks(expected_kv(level, ids)), "cpu")


@pytest.mark.parametrize("codec", CODECS)
def test_stored_rows_crc_and_page_in(tmp_path, codec):
    """What is stored is the codec's rows (and their crc32 is the index row's); a block reads the same hot or
    cold, decoded or kept encoded in the hot tier; page-in counts stored and decoded bytes."""
    b = backend(tmp_path / "st", codec)
    fill(b, 3)
    b.flush()
    c = build_codec(codec)
    for level in LEVELS:
        n = b.count(level)
        rows = b.archive.read(level, np.arange(n))
        want = c.encode_blocks(expected_kv(level, range(n))).rows
        assert np.array_equal(rows, to_numpy(want))  # the codec's bytes, bit for bit
        t = b.table.fetch("s", level, np.arange(n), ["crc32"])
        assert t.column("crc32").to_pylist() == [zlib.crc32(r.tobytes()) for r in rows]
        assert torch.equal(b.load_kv(level, torch.arange(n)), round_trip(codec, level, range(n)))  # hot
        attrs = b.archive.parts(level)[0].array.attrs
        if codec == "none":
            assert attrs["mukv_dtype"] == "bfloat16" and "mukv_codec" not in attrs  # the format before codecs
        else:
            assert attrs["mukv_dtype"] == f"bfloat16+{codec}" and attrs["mukv_codec"]["name"] == codec
    b.close()
    for opts in ({"hot_bytes": 0}, {"hot_encoded": True}, {}):
        again = backend(tmp_path / "st", codec, **opts)
        for level in LEVELS:
            n = again.count(level)
            ids = torch.tensor([n - 1, 0, n - 1, 1])  # any order, repeats
            for _ in range(2):  # cold, then (promoted) hot
                assert torch.equal(again.load_kv(level, ids), round_trip(codec, level, ids.tolist()))
        p = again.tier_stats()["pagein"]
        decoded = sum(again.count(lv) for lv in LEVELS)  # distinct blocks read from disk
        assert p["blocks_disk"] >= min(4, decoded) and p["bytes_decoded"] >= p["bytes_disk"]
        if codec != "none":
            assert p["bytes_disk"] < p["bytes_decoded"]
        again.close()


@pytest.mark.parametrize("codec", ["int4", "none"])
def test_hot_tier_holds_encoded_blocks(tmp_path, codec):
    """``hot_encoded``: the same budget holds more blocks, and they decode to the same KV."""
    held = {}
    for encoded in (False, True):
        b = backend(tmp_path / f"st{encoded}", codec, hot_bytes=16 << 10, hot_slab_bytes=4096,
                    hot_encoded=encoded)
        fill(b, 16)
        b.flush()
        held[encoded] = sum(b.hot.blocks().values())
        for level in LEVELS:
            n = b.count(level)
            assert torch.equal(b.load_kv(level, torch.arange(n)), round_trip(codec, level, range(n)))
        b.close()
    if codec == "none":
        assert held[True] == held[False]
    else:
        assert held[True] > 1.5 * held[False], held


def test_non_finite_kv_is_refused_and_nothing_stored(tmp_path):
    b = backend(tmp_path / "st", "int4")
    fill(b)
    b.flush()
    before = {lv: b.count(lv) for lv in LEVELS}
    bad = synth_blocks("frame", b.count("frame"), 2)
    bad.kv[1, 0, 1, 0, 0, 0] = float("nan")
    with pytest.raises(mukv.InputError, match=r"rows \[1\]\) holds NaN or infinite values; refused"):
        b.add(bad)
    assert {lv: b.count(lv) for lv in LEVELS} == before
    fill(b)  # the store goes on
    b.flush()
    assert b.verify()["ok"]
    n = b.count("frame")
    assert torch.equal(b.load_kv("frame", torch.arange(n)), round_trip("int4", "frame", range(n)))
    b.close()


def test_codec_change_between_sessions_mixes_arrays_safely(tmp_path):
    """A stream written with "none", then int4, then int8 and "none" again: each level keeps one array per run,
    every block reads with its own codec, hot or cold, after any reopen; verify_store checks them all."""
    path = tmp_path / "st"
    runs = ["none", {"name": "int4", "group_size": 4}, "int8", "none"]
    owner = {lv: [] for lv in LEVELS}  # the codec of each block
    for spec in runs:
        b = TieredBackend(LAYOUT, str(path), "cpu", stream_id="s", codec=build_codec(spec), commit_interval=0.0)
        fill(b)
        b.flush()
        for lv in LEVELS:
            owner[lv] += [spec] * (b.count(lv) - len(owner[lv]))
        b.close()
    for spec in runs[:2]:  # reopen with any setting: every block reads back
        for opts in ({"hot_bytes": 0}, {}):
            b = TieredBackend(LAYOUT, str(path), "cpu", stream_id="s", codec=build_codec(spec), **opts)
            for lv in LEVELS:
                n = b.count(lv)
                parts = b.archive.parts(lv)
                assert [p.first for p in parts] == [0, n // 4, n // 2, 3 * n // 4]
                assert [p.codec.name for p in parts] == ["none", "int4", "int8", "none"]
                ids = torch.from_numpy(np.random.default_rng(1).permutation(n))
                want = torch.stack([round_trip(owner[lv][i], lv, [i])[0] for i in ids.tolist()])
                assert torch.equal(b.load_kv(lv, ids), want)
            b.close()
    rep = verify_store(str(path))
    assert rep.ok, rep.summary()
    assert sum(v["verified"] for v in rep.streams["s"].values()) == sum(len(o) for o in owner.values())


def test_session_reopens_with_another_setting(tmp_path, tiny_model, capsys):
    path = tmp_path / "st"
    with mukv.Session(model=tiny_model, backend="lancedb", path=path, config={"kv_codec": "int4"}) as s:
        s.feed(frames(8))
        first = s.stats()
        ask = s.ask("what color was the car?")
    with mukv.Session.open(path, model=tiny_model) as s:  # the stored configuration: int4 again
        assert s.codec.name == "int4"
        assert [(b.level, b.block_id) for b in s.ask("what color was the car?").blocks] == \
            [(b.level, b.block_id) for b in ask.blocks]
    with mukv.Session.open(path, model=tiny_model, config={"kv_codec": "int8"}) as s:
        s.feed(frames(8, seed=1))
        s.backend.flush()
        parts = {lv: [p.codec.name for p in s.backend.archive.parts(lv)] for lv in ("patch", "frame", "segment")}
        assert all(p == ["int4", "int8"] for p in parts.values()), parts
        assert s.stats()["bytes"] > first["bytes"]
        assert len(s.ask("what color was the car?").blocks) > 0
    assert verify_store(str(path)).ok
    from mukv import cli

    assert cli.main(["inspect", str(path), "--model", "tiny-llava-ov"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("codec"))
    assert line.startswith('codec    "int4" for new blocks; arrays patch: int4 from block 0, int8 from block '), line


def test_a_store_written_before_codecs_opens_unchanged(tmp_path, tiny_model):
    """tests/data/legacy_store was written by the code before KV codecs (tests/data/make_legacy_store.py):
    it opens with every setting, reads the same bytes, answers the same, and only new blocks get new arrays."""
    path = tmp_path / "legacy"
    shutil.copytree(DATA / "legacy_store", path)
    expected = json.loads((DATA / "legacy_store_expected.json").read_text())
    arrays = {p: p.read_bytes() for p in (path / "kv").rglob("zarr.json")}
    assert verify_store(str(path)).ok
    with mukv.Session.open(path, stream_id="cam", dtype=torch.bfloat16, backend_options={"hot_bytes": 0}) as s:
        assert s.codec.name == "none"
        for level, crcs in expected["kv_crc32"].items():
            kv = s.backend.load_kv(level, torch.arange(len(crcs)))
            assert [zlib.crc32(kv[i].contiguous().view(torch.int16).numpy().tobytes()) for i in range(len(crcs))] \
                == crcs
        assert s.ask("what happened?", max_new_tokens=4).text == expected["answer"]
    assert {p: p.read_bytes() for p in (path / "kv").rglob("zarr.json")} == arrays  # no array was rewritten
    with mukv.Session.open(path, stream_id="cam", dtype=torch.bfloat16, config={"kv_codec": "int4"}) as s:
        s.feed(frames(4, seed=5))
        s.backend.flush()
        for level, crcs in expected["kv_crc32"].items():
            n = s.backend.count(level)
            assert n == 2 * len(crcs)
            assert [p.rel.rsplit("/", 1)[-1] for p in s.backend.archive.parts(level)] == \
                [f"{level}.zarr", f"{level}@{len(crcs)}.zarr"]
            kv = s.backend.load_kv(level, torch.arange(len(crcs)))
            assert [zlib.crc32(kv[i].contiguous().view(torch.int16).numpy().tobytes()) for i in range(len(crcs))] \
                == crcs
    rep = verify_store(str(path))
    assert rep.ok, rep.summary()


def test_recovery_drops_an_uncommitted_array(tmp_path):
    """A writer killed after it started a new array (another codec) but before committing its blocks: the next
    writer removes the array, and the stream is as committed."""
    b = backend(tmp_path / "st", "int4")
    fill(b)
    b.flush()
    counts = {lv: b.count(lv) for lv in LEVELS}
    b.close()
    arch = KVArchive(Files(str(tmp_path / "st")), "s", LAYOUT.dtype, codec=build_codec("int8"))
    c = build_codec("int8")
    for lv, n in counts.items():  # what the killed writer left: rows of new blocks in a new array
        arch.write(lv, n, to_numpy(c.encode_blocks(expected_kv(lv, range(n, n + 2))).rows),
                   tuple(expected_kv(lv, [0]).shape[1:]))
    assert all(len(arch.parts(lv)) == 2 for lv in LEVELS)
    again = backend(tmp_path / "st", "int8")
    assert {lv: again.count(lv) for lv in LEVELS} == counts
    assert again.recovered["kv_rows"] == {lv: 2 for lv in LEVELS}
    assert all(len(again.archive.parts(lv)) == 1 for lv in LEVELS)
    assert not list((tmp_path / "st" / "kv" / "s").glob("*@*.zarr"))
    fill(again)  # the new codec starts its array where the committed blocks end
    again.flush()
    assert [p.first for p in again.archive.parts("frame")] == [0, counts["frame"]]
    assert again.verify()["ok"]
    again.close()


def _part_meta(path: Path, rel: str) -> tuple[Path, dict]:
    f = path / rel / "zarr.json"
    return f, json.loads(f.read_text())


def test_verify_reports_what_codecs_cannot_read(tmp_path, monkeypatch):
    path = tmp_path / "st"
    for spec in ("int4", "int8", "none"):
        b = backend(path, spec)
        fill(b)
        b.flush()
        b.close()
    assert verify_store(str(path)).ok
    # a codec that is not installed
    f, meta = _part_meta(path, "kv/s/patch@8.zarr")
    meta["attributes"]["mukv_codec"]["name"] = "zstd9"
    f.write_text(json.dumps(meta))
    rep = verify_store(str(path))
    assert not rep.ok and any(p.kind == "kv_array" and "'zstd9', which is not installed" in p.message
                              for p in rep.damage), rep.summary()
    with pytest.raises(mukv.StoreError, match="zstd9"):
        backend(path, "int4", read_only=True).load_kv("patch", torch.arange(16))
    meta["attributes"]["mukv_codec"]["name"] = "int8"
    # a block shape its rows do not have
    meta["attributes"]["mukv_block_shape"][3] += 1
    f.write_text(json.dumps(meta))
    rep = verify_store(str(path))
    assert any(p.kind == "kv_array" and "writes uint8" in p.message for p in rep.damage), rep.summary()
    meta["attributes"]["mukv_block_shape"][3] -= 1
    f.write_text(json.dumps(meta))
    assert verify_store(str(path)).ok
    # an array gone: its blocks have no KV
    shutil.rmtree(path / "kv/s/frame@2.zarr")
    rep = verify_store(str(path))
    assert any(p.kind == "missing_kv" and p.level == "frame" and p.blocks == (2, 3) for p in rep.damage), rep.summary()
    # rows that match their crc32 but decode to NaN
    from mukv.plugins.codecs.int4 import Int4Codec

    monkeypatch.setattr(Int4Codec, "decode", lambda self, enc, device: torch.full(
        (len(enc), *enc.block_shape), float("nan"), dtype=enc.dtype))
    rep = verify_store(str(path))
    assert any(p.kind == "undecodable_kv" and p.level == "segment" for p in rep.damage), rep.summary()


def test_corrupt_encoded_bytes_fail_their_checksum(tmp_path):
    b = backend(tmp_path / "st", "int4", hot_bytes=0)
    fill(b, 4)
    b.flush()
    n = b.count("segment")
    ((shard_path, offset, nbytes),) = b.archive.locate("segment", np.array([1]))
    raw = bytearray(shard_path.read_bytes())
    raw[offset + nbytes - 40] ^= 0x10  # a bit of block 1's scales
    shard_path.write_bytes(bytes(raw))
    b.archive.forget()
    with pytest.raises(mukv.StoreError, match=r"segment blocks \[1\] of stream 's' fail their checksum"):
        b.load_kv("segment", torch.arange(n))
    b.close()
    rep = verify_store(str(tmp_path / "st"))
    assert any(p.kind == "corrupt_kv" and p.blocks == (1,) for p in rep.damage), rep.summary()


def test_reader_beside_a_writer_sees_a_new_codec(tmp_path):
    w = backend(tmp_path / "st", "none")
    fill(w)
    w.flush()
    w.close()
    w = backend(tmp_path / "st", "int8")
    with pytest.warns(UserWarning, match="read-only"):
        r = backend(tmp_path / "st", "int4")
    fill(w)
    w.flush()
    r.refresh()
    for lv in LEVELS:
        n = r.count(lv)
        assert n == w.count(lv)
        want = torch.cat([round_trip("none", lv, range(n // 2)), round_trip("int8", lv, range(n // 2, n))])
        assert torch.equal(r.load_kv(lv, torch.arange(n)), want)
    r.close()
    w.close()


def test_kivi4_range_search_store_reads_with_the_plain_codec(tmp_path):
    """kivi4 with range_search writes kivi4's format: the array records the plain codec (the search is the
    encoder's business), the rows are the searched encoder's bytes, a session reopening with plain kivi4
    reads them back and appends to the same array, and verify_store checks them."""
    path = tmp_path / "st"
    searched = {"name": "kivi4", "channel_tokens": 5, "range_search": True}  # segment blocks (K 9) per channel
    plain = {"name": "kivi4", "channel_tokens": 5}
    b = backend(path, searched)
    fill(b)
    b.flush()
    differ = []
    for level in LEVELS:
        n = b.count(level)
        rows = b.archive.read(level, np.arange(n))
        assert np.array_equal(rows, to_numpy(build_codec(searched).encode_blocks(expected_kv(level, range(n))).rows))
        differ.append(not np.array_equal(rows, to_numpy(build_codec(plain).encode_blocks(
            expected_kv(level, range(n))).rows)))
        attrs = b.archive.parts(level)[0].array.attrs
        assert attrs["mukv_codec"] == build_codec(plain).record()
    assert all(differ)  # the search chose other ranges than the minimum and maximum
    b.close()
    again = backend(path, plain, hot_bytes=0)
    first = {lv: again.count(lv) for lv in LEVELS}
    for level in LEVELS:
        ids = torch.arange(first[level])
        assert torch.equal(again.load_kv(level, ids), round_trip(searched, level, ids.tolist()))
    fill(again)  # plain kivi4 goes on in the same array
    again.flush()
    for level in LEVELS:
        assert len(again.archive.parts(level)) == 1
        n = again.count(level)
        ids = torch.arange(n)
        want = torch.cat([round_trip(searched, level, range(first[level])),
                          round_trip(plain, level, range(first[level], n))])
        assert torch.equal(again.load_kv(level, ids), want)
    again.close()
    rep = verify_store(str(path))
    assert rep.ok, rep.summary()
