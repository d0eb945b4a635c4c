"""Streams of a disk store as units: list, delete, export, import.

* :func:`list_streams`: every stream with its frames, time span (wall-clock too when known), bytes,
  model, sources and gaps, without loading a model;
* :func:`delete_stream`: the state file goes first (the stream no longer exists from that moment),
  then its index rows, KV and files; a delete cut short leaves leftovers that ``verify_store``
  reports and a second delete (or the next writer of that id) removes;
* :func:`export_stream`: a self-contained store holding one stream (manifest, index rows, KV arrays
  with their own metadata, stream files, state last), local or ``s3://``, checked after writing;
* :func:`import_stream`: a verified export (or any store's stream) copied into a store under a
  free id, its state written last, checked after writing.

Copies read only committed blocks (ids below the counts of the state read at the start), which
never change once committed: a stream may be exported while it is being written.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from mukv.errors import StoreError

from .files import FORMAT, Files, WriterLock, check_stream_id, disk_error, tree_bytes
from .state_file import read_state, validate_manifest

MANIFEST = "mukv.json"
#: blocks copied per read/write when exporting or importing
COPY_BLOCKS = 64
#: index rows read per query when exporting or importing
COPY_ROWS = 16384


def _files(path: str, storage_options: dict[str, Any] | None) -> Files:
    files = Files(str(path), storage_options)
    if not files.remote and not files.local.is_dir():
        raise StoreError(f"{path}: no such store")
    return files


def _manifest(files: Files):
    raw = files.read_json(MANIFEST)
    if raw is None:
        raise StoreError(f"{files.uri()}: not a mukv store (no {MANIFEST})")
    return validate_manifest(raw, files.uri(MANIFEST), FORMAT)


def stream_ids(files: Files) -> list[str]:
    out = []
    for name in files.listing("streams"):
        if name.endswith(".json") and not name.startswith("."):
            try:
                out.append(check_stream_id(name[: -len(".json")]))
            except StoreError:
                continue
    return sorted(out)


def _unknown(files: Files, sid: str) -> StoreError:
    known = stream_ids(files)
    return StoreError(f"{files.uri()}: no stream {sid!r}; streams: {', '.join(known) if known else 'none'}")


def _kv_bytes(files: Files, sid: str, counts: dict[str, int], levels: dict[str, Any], layout: dict[str, Any]) -> int:
    if not files.remote:
        return tree_bytes(files.local / "kv" / sid)
    elem = 2 if layout["dtype"] in ("bfloat16", "float16") else 4
    return sum(int(np.prod(levels[lv]["block_shape"])) * elem * n for lv, n in counts.items() if lv in levels)


def list_streams(path: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every stream of a store: ``id``, ``frames``, ``t_start``, ``t_end`` (stream seconds),
    ``wall_start``, ``wall_end`` (ISO 8601 or ``None``), ``bytes`` (KV on disk), ``blocks`` per level,
    ``model``, ``sources``, ``gaps``, ``writer`` (pid of a process writing it, local stores), and
    ``error`` for a stream whose state cannot be read."""
    from mukv.clock import iso

    from .verify import writer_active

    files = _files(path, storage_options)
    manifest = _manifest(files)
    layout = manifest.layout.model_dump()
    out = []
    for sid in stream_ids(files):
        entry: dict[str, Any] = {"id": sid}
        try:
            found = read_state(files, sid, layout)
        except StoreError as exc:
            out.append({**entry, "error": str(exc)})
            continue
        if found is None:
            continue
        state, values = found
        contract = values.session
        if contract is None and not any(state.counts.values()):
            continue  # a stream being created (its state holds a writer's lease, no contract yet)
        origin = contract.wall_origin if contract else None
        first = values.first_time if values.first_time is not None else (
            min((s.times[0] for s in values.sources if s.times), default=None))
        levels = {lv: info.model_dump() for lv, info in state.levels.items()}
        entry.update(
            frames=values.frames_seen, t_start=first, t_end=values.last_time,
            wall_start=iso(first, origin), wall_end=iso(values.last_time, origin),
            bytes=_kv_bytes(files, sid, dict(state.counts), levels, layout), blocks=dict(state.counts),
            model=contract.model if contract else None, frame_size=contract.frame_size if contract else None,
            sources=[s.model_dump() for s in values.sources], gaps=[g.model_dump() for g in values.gaps],
            writer=_holder(files, sid) if writer_active(files, sid) else None,
        )
        out.append(entry)
    return out


def _holder(files: Files, sid: str) -> str:
    return WriterLock(files.local / "streams" / f"{sid}.lock").holder()


def _lock(files: Files, sid: str, lease_ttl: float = 30.0, clock_skew: float = 10.0) -> Any:
    """The stream's writer lock (local stores) or lease (object stores: :class:`~.lease.StreamLease`), or
    a StoreError naming who holds it."""
    if files.remote:
        from .lease import LeaseHeld, StreamLease

        lease = StreamLease(files, f"streams/{sid}.json", lease_ttl, None, clock_skew)
        try:
            lease.acquire()
        except LeaseHeld as exc:
            raise StoreError(f"{files.uri()}: stream {sid!r} is being written by another process ({exc})") from None
        return lease
    lock = WriterLock(files.local / "streams" / f"{sid}.lock")
    if not lock.acquire():
        raise StoreError(f"{files.uri()}: stream {sid!r} is being written by another process (pid {lock.holder()}); "
                         "stop it first")
    return lock


def delete_stream(path: str, stream_id: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Delete a stream and reclaim its disk (see the module docstring).

    Returns:
        ``{"id", "blocks", "index_rows", "kv_bytes", "files"}``: what was removed.

    Raises:
        StoreError: no such stream (the message lists the store's streams), or another process writes it.
    """
    from .lance_index import BlockTable

    sid = check_stream_id(stream_id)
    files = _files(path, storage_options)
    manifest = _manifest(files)
    layout = manifest.layout.model_dump()
    rel = f"streams/{sid}.json"
    try:
        found = read_state(files, sid, layout)
    except StoreError:
        found = None  # a damaged state: the stream is deleted all the same
        if files.read(rel) is None:
            raise
    leftovers = files.listing(f"kv/{sid}") or files.listing(f"streams/{sid}") or files.listing(f"layerkeys/{sid}")
    if found is None and files.read(rel) is None and not leftovers:
        raise _unknown(files, sid)
    lock = _lock(files, sid)
    try:
        counts = dict(found[0].counts) if found else {}
        levels = {lv: i.model_dump() for lv, i in found[0].levels.items()} if found else {}
        kv_bytes = _kv_bytes(files, sid, counts, levels, layout)
        files.delete(rel)  # from here on the stream does not exist
        table = BlockTable(files, manifest.layout.num_kv_heads * manifest.layout.head_dim, vector_index_rows=None)
        rows = table.delete_uncounted(sid, {})  # every row of the stream
        removed = (remove_tree(files, f"kv/{sid}") + remove_tree(files, f"layerkeys/{sid}")
                   + remove_tree(files, f"streams/{sid}"))
        try:
            table.maintain()  # compaction drops the deleted rows' fragments (old versions go after 5 minutes)
        except Exception:  # noqa: BLE001 - upkeep is an optimisation
            pass
        return {"id": sid, "blocks": counts, "index_rows": rows, "kv_bytes": kv_bytes, "files": removed}
    finally:
        if lock is not None:
            lock.release()
            if not files.remote:
                try:
                    lock.path.unlink()
                except OSError:
                    pass


def remove_tree(files: Files, rel: str) -> int:
    """Delete every file under ``rel``; returns how many."""
    if files.remote:
        import obstore

        n = 0
        for batch in obstore.list(files.object_store, prefix=f"{rel}/"):
            for obj in batch:
                files.delete(obj["path"])
                n += 1
        return n
    import shutil

    root = files.local / rel
    if not root.exists():
        return 0
    n = sum(1 for p in root.rglob("*") if p.is_file())
    shutil.rmtree(root)
    return n


def _copy_stream(src: Files, sid: str, dst: Files, did: str, layout_src: Any, check_crc: bool = True,
                 lease: Any = None) -> dict[str, Any]:
    """Copy committed stream ``sid`` of ``src`` to stream ``did`` of ``dst`` (whose manifest exists and
    matches): KV arrays (with their metadata), index rows, stream files, then the state file."""
    import pyarrow as pa
    import zarr
    import zarr.storage

    from .lance_index import BlockTable
    from .zarr_kv import KVArchive, block_crc, dtype_from_name

    layout = layout_src.model_dump()
    found = read_state(src, sid, layout)
    if found is None:
        raise _unknown(src, sid)
    state, values = found
    counts = dict(state.counts)
    vdim = layout_src.num_kv_heads * layout_src.head_dim
    src_table = BlockTable(src, vdim, read_only=True, vector_index_rows=None)
    dst_table = BlockTable(dst, vdim, vector_index_rows=None)
    stores = [zarr.storage.ObjectStore(f.object_store) if f.remote else zarr.storage.LocalStore(str(f.local))
              for f in (src, dst)]
    src_kv = KVArchive(src, sid, dtype_from_name(layout["dtype"]), read_only=True)
    copied: dict[str, int] = {}
    for level, n in sorted(counts.items()):
        if n == 0:
            continue
        parts = [p for p in src_kv.parts(level) if p.first < n]  # one array per codec the level was written with
        if not parts or parts[0].first != 0 or any(a.end != b.first for a, b in zip(parts, parts[1:])) \
                or parts[-1].end < n:
            raise StoreError(f"{src.uri()}: stream {sid!r} {level}: the KV arrays do not hold committed blocks "
                             f"0..{n - 1}; run `mukv inspect --verify`")
        made = {}
        for p in parts:
            rel = f"kv/{did}/" + p.rel[len(f"kv/{sid}/"):]
            a = p.array
            made[p.rel] = (p, rel, zarr.create_array(
                store=stores[1], name=rel, shape=(min(p.end, n) - p.first, *a.shape[1:]), chunks=a.chunks,
                shards=a.shards, dtype=a.dtype, fill_value=0, compressors=None, attributes=dict(a.attrs)))
        dst_table.table(create=True)
        dst_cols = dst_table.table().schema.names
        for r0 in range(0, n, COPY_ROWS):
            r1 = min(n, r0 + COPY_ROWS)
            rows = src_table.fetch(sid, level, np.arange(r0, r1), src_table.table().schema.names)
            if rows is None or rows.num_rows != r1 - r0:
                raise StoreError(f"{src.uri()}: stream {sid!r} {level}: index rows of committed blocks {r0}..{r1 - 1} "
                                 "are missing; run `mukv inspect --verify`")
            crc = rows.column("crc32").to_numpy()
            for p, _, b in made.values():
                for lo in range(max(r0, p.first), min(r1, p.end), COPY_BLOCKS):
                    hi = min(r1, p.end, lo + COPY_BLOCKS)
                    data = np.asarray(p.array[lo - p.first : hi - p.first])
                    if check_crc and not np.array_equal(block_crc(data), crc[lo - r0 : hi - r0]):
                        raise StoreError(f"{src.uri()}: stream {sid!r} {level} blocks {lo}..{hi - 1}: KV does not "
                                         "match its checksum; nothing was committed at the destination")
                    b[lo - p.first : hi - p.first] = data
            m = rows.num_rows
            paths = [made[r][1] if r in made else r for r in rows.column("kv_path").to_pylist()]
            if any(not q.startswith(f"kv/{did}/") for q in paths):
                raise StoreError(f"{src.uri()}: stream {sid!r} {level}: index rows point to KV arrays the stream "
                                 "does not have; run `mukv inspect --verify`")
            rows = rows.set_column(rows.column_names.index("stream_id"), "stream_id", pa.array([did] * m, pa.string()))
            rows = rows.set_column(rows.column_names.index("kv_path"), "kv_path", pa.array(paths, pa.string()))
            ones = pa.array(np.ones(m, dtype=np.int64))
            if "txn" in rows.column_names:
                rows = rows.set_column(rows.column_names.index("txn"), "txn", ones)
            elif "txn" in dst_cols:
                rows = rows.append_column("txn", ones)
            dst_table.add(rows.select(dst_cols))
        copied[level] = n
    from .layer_keys import LayerKeyArchive

    keys = LayerKeyArchive(src, sid, torch.float16, read_only=True)  # ReKV's per-layer keys, where stored
    for level in keys.levels():
        n = int(counts.get(level, 0))
        for p in keys.parts(level):
            if p.first >= n:
                continue
            a, m = p.array, min(p.end, n) - p.first
            b = zarr.create_array(store=stores[1], name=f"layerkeys/{did}/" + p.rel[len(f"layerkeys/{sid}/"):],
                                  shape=(m, *a.shape[1:]), chunks=a.chunks, shards=a.shards, dtype=a.dtype,
                                  fill_value=0, compressors=None, attributes=dict(a.attrs))
            for lo in range(0, m, COPY_BLOCKS):
                b[lo : min(m, lo + COPY_BLOCKS)] = np.asarray(a[lo : min(m, lo + COPY_BLOCKS)])
    n_files = 0
    for rel in _walk(src, f"streams/{sid}"):
        data = src.read(rel, max_bytes=1 << 30)
        if data is not None:
            dst.write(f"streams/{did}/" + rel[len(f"streams/{sid}/"):], data)
            n_files += 1
    raw = src.read_json(f"streams/{sid}.json")
    raw.pop("lease", None)
    raw.update(stream_id=did, txn=1, updated=time.time())
    if lease is not None:
        lease.write_state(raw)  # the commit point, fenced by the destination stream's lease
    else:
        dst.write_json(f"streams/{did}.json", raw)  # the commit point
    return {"blocks": copied, "files": n_files, "frames": values.frames_seen}


def _walk(files: Files, rel: str) -> list[str]:
    if files.remote:
        import obstore

        return [obj["path"] for batch in obstore.list(files.object_store, prefix=f"{rel}/") for obj in batch]
    root = files.local / rel
    return sorted(str(p.relative_to(files.local)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _new_store(dst: Files, manifest: Any) -> None:
    if not dst.remote and dst.local.exists() and any(dst.local.iterdir()) and dst.read(MANIFEST) is None:
        raise StoreError(f"{dst.uri()}: not empty and not a mukv store; choose an empty or new folder")
    raw = dst.read_json(MANIFEST)
    if raw is None:
        dst.write_json(MANIFEST, {**manifest.model_dump(), "created": time.time()})
        return
    have = validate_manifest(raw, dst.uri(MANIFEST), FORMAT)
    mine, theirs = manifest.layout.model_dump(), have.layout.model_dump()
    diff = [k for k in ("num_layers", "num_kv_heads", "head_dim", "dtype") if mine[k] != theirs[k]]
    if mine.get("model_id") and theirs.get("model_id") and mine["model_id"] != theirs["model_id"]:
        diff.append("model_id")
    if diff:
        raise StoreError(f"{dst.uri()}: holds another model's KV ({', '.join(f'{k}={theirs[k]!r}' for k in diff)}); "
                         f"the stream's is {', '.join(f'{k}={mine[k]!r}' for k in diff)}")


def _discard(dst: Files, did: str, manifest: Any) -> None:
    from .lance_index import BlockTable

    try:
        dst.delete(f"streams/{did}.json")
        BlockTable(dst, manifest.layout.num_kv_heads * manifest.layout.head_dim, vector_index_rows=None
                   ).delete_uncounted(did, {})
        remove_tree(dst, f"kv/{did}")
        remove_tree(dst, f"layerkeys/{did}")
        remove_tree(dst, f"streams/{did}")
    except Exception:  # noqa: BLE001 - best effort; verify_store reports what is left
        pass


def export_stream(path: str, stream_id: str, dest: str, storage_options: dict[str, Any] | None = None,
                  dest_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy a stream into a new self-contained store at ``dest`` (see the module docstring).

    Raises:
        StoreError: no such stream, ``dest`` already holds a mukv store or other files, a damaged block.
    """
    from .verify import verify_store

    sid = check_stream_id(stream_id)
    src = _files(path, storage_options)
    manifest = _manifest(src)
    dst = Files(str(dest), dest_options)
    if dst.read(MANIFEST) is not None:
        raise StoreError(f"{dest}: already a mukv store; export into a new or empty folder")
    if read_state(src, sid, manifest.layout.model_dump()) is None:
        raise _unknown(src, sid)
    _new_store(dst, manifest)
    out = _copy_stream(src, sid, dst, sid, manifest.layout)
    report = verify_store(str(dest), storage_options=dest_options)
    if not report.ok:
        raise StoreError(f"{dest}: the export does not verify: {report.damage[0].message}")
    return {"id": sid, "dest": str(dest), **out}


def import_stream(path: str, src: str, stream_id: str | None = None, from_stream: str | None = None,
                  storage_options: dict[str, Any] | None = None, src_options: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Take a stream of store ``src`` (an export) into store ``path`` (created if missing) as
    ``stream_id`` (default: its own id). The source is verified first and the result after.

    Raises:
        StoreError: the source does not verify, holds several streams and ``from_stream`` is not given,
            the id is taken, or the stores' models differ.
    """
    from .verify import verify_store

    sfiles = _files(src, src_options)
    manifest = _manifest(sfiles)
    ids = stream_ids(sfiles)
    if from_stream is None:
        if len(ids) != 1:
            raise StoreError(f"{src}: holds {len(ids)} streams ({', '.join(ids) or 'none'}); name the one to import")
        from_stream = ids[0]
    elif from_stream not in ids:
        raise _unknown(sfiles, check_stream_id(from_stream))
    did = check_stream_id(stream_id or from_stream)
    report = verify_store(str(src), stream_id=from_stream, storage_options=src_options)
    if not report.ok:
        raise StoreError(f"{src}: does not verify, nothing was imported: {report.damage[0].message}")
    dst = Files(str(path), storage_options)
    if not dst.remote:
        try:
            dst.local.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise disk_error(exc, f"creating the store folder {dst.local}") from None
    _new_store(dst, manifest)
    if did in stream_ids(dst) or dst.listing(f"kv/{did}"):
        raise StoreError(f"{path}: stream {did!r} exists; import under another id")
    lock = _lock(dst, did)
    try:
        out = _copy_stream(sfiles, from_stream, dst, did, manifest.layout, lease=lock if dst.remote else None)
    except BaseException:
        _discard(dst, did, manifest)  # nothing of a failed import stays
        raise
    finally:
        if lock is not None:
            lock.release()
    check = verify_store(str(path), stream_id=did, storage_options=storage_options)
    if not check.ok:
        raise StoreError(f"{path}: the imported stream {did!r} does not verify: {check.damage[0].message}")
    return {"id": did, "source": str(src), **out}
