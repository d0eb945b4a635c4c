"""Block vectors and metadata on disk: one lancedb table for every stream of a store.

One row per stored block::

    stream_id, level, block_id, segment_id, frame_start, frame_end, t_start, t_end,
    tokens (K), kept [K], token_index [K], positions [K], kv_path, kv_row, crc32,
    vector [V] (float32)

Filters are built here and only here, from validated stream ids and level
names (:func:`~mukv.backends.disk.files.check_stream_id`) and integers: user
text never reaches a ``where`` clause. Searches are cosine; the table is
scanned exactly until it holds ``vector_index_rows`` rows, then an IVF_PQ
index is built (and kept up to date by :meth:`BlockTable.maintain`, which also
compacts the small fragments that frequent commits leave). Even then, a search
over a stream's level of at most ``exact_rows`` blocks scans exactly: lance
trains the index's partitions with an unseeded k-means, so through the index two
runs of the same stream can retrieve different blocks.
"""

from __future__ import annotations

import contextlib
import math
import threading
from datetime import timedelta
from typing import Any, Iterator

import numpy as np

from mukv.errors import StoreError

from .files import Files, check_level, check_stream_id, lance_storage_options

TABLE = "blocks"
#: columns every search returns (the rest are fetched by id when needed)
META_COLUMNS = ["block_id", "segment_id", "frame_start", "frame_end", "t_start", "t_end"]


def schema(vector_dim: int):
    import pyarrow as pa

    return pa.schema([
        pa.field("stream_id", pa.string(), nullable=False),
        pa.field("level", pa.string(), nullable=False),
        pa.field("block_id", pa.int64(), nullable=False),
        pa.field("segment_id", pa.int64(), nullable=False),
        pa.field("frame_start", pa.int64(), nullable=False),
        pa.field("frame_end", pa.int64(), nullable=False),
        pa.field("t_start", pa.float64(), nullable=False),
        pa.field("t_end", pa.float64(), nullable=False),
        pa.field("tokens", pa.int32(), nullable=False),
        pa.field("kept", pa.list_(pa.int32())),
        pa.field("token_index", pa.list_(pa.int32())),
        pa.field("positions", pa.list_(pa.int64())),
        pa.field("kv_path", pa.string(), nullable=False),
        pa.field("kv_row", pa.int64(), nullable=False),
        pa.field("crc32", pa.int64(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), vector_dim)),
        # the transaction that wrote the row (format 2): rows of a transaction the stream's state has not
        # committed are a killed writer's leftovers; rows of a committed one are data
        pa.field("txn", pa.int64(), nullable=False),
    ])


@contextlib.contextmanager
def lance_errors(where: str, what: str) -> Iterator[None]:
    """Turn an error of lancedb (a missing or damaged file, a full disk, ...) into a :class:`StoreError`."""
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:  # lancedb raises RuntimeError, OSError, ValueError, its own types
        text = str(exc).split(", /", 1)[0].strip() or type(exc).__name__  # drop lance's source location
        low = text.lower()
        if "no space left" in low or "quota exceeded" in low:
            raise StoreError(f"{where}: disk full while {what} ({text})") from None
        hint = "; run `mukv inspect --verify` to see what is damaged" if "not found" in low or "corrupt" in low else ""
        raise StoreError(f"{where}: lancedb index error while {what}: {text}{hint}") from None


def within_seconds(fn, seconds: float | None, what: str, where: str):
    """``fn()``, given up on after ``seconds``: lance has been seen to deadlock (every thread parked,
    nothing ever returning) under many concurrent writers and readers of one table, and a stream
    should get an error it can act on rather than wait forever. ``fn`` runs on a daemon thread of
    its own (a hung one must not keep the process from exiting); ``None``: run it here.

    Raises:
        StoreError: ``fn`` did not return within ``seconds`` (its thread is left to it).
    """
    if seconds is None:
        return fn()
    box: dict[str, Any] = {}
    done = threading.Event()

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=call, name="mukv-lance-call", daemon=True).start()
    if not done.wait(seconds):
        raise StoreError(f"{where}: lancedb did not finish {what} within {seconds:g} s (backend option "
                         "lance_call_timeout); lance may be hung, and later calls to this store in this process "
                         "may hang the same way: restart the process. What was committed before stays readable.")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _stream_level(stream_id: str, level: str) -> str:
    return f"stream_id = '{check_stream_id(stream_id)}' AND level = '{check_level(level)}'"


def merge_ranges(within: np.ndarray) -> list[tuple[int, int]]:
    """Sorted, merged ``[start, end)`` frame ranges (``within [R, 2]``)."""
    rs = sorted((int(a), int(b)) for a, b in np.asarray(within, dtype=np.int64).reshape(-1, 2) if b > a)
    out: list[list[int]] = []
    for a, b in rs:
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def where(stream_id: str, level: str, below: int | None, within: np.ndarray | None = None) -> str:
    """The filter of one stream's level: ids ``< below`` (``None``: no bound) and, optionally, blocks inside
    frame ranges (``within [R, 2]``).

    A block is inside ``[a, b)`` when ``frame_start >= a AND frame_end <= b``. The filter also says
    ``frame_start <= b`` (implied: a block never ends before it starts, see ``TieredBackend.add``), so that
    lance finds the candidate rows through its ``frame_start`` BTREE and checks ``frame_end`` on those
    alone, instead of reading the frame columns of every row of the level.
    """
    clause = _stream_level(stream_id, level) + ("" if below is None else f" AND block_id < {int(below)}")
    if within is not None:
        ranges = merge_ranges(within)
        if not ranges:
            return clause + " AND false"
        starts = " OR ".join(f"(frame_start >= {a} AND frame_start <= {b})" for a, b in ranges)
        inside = " OR ".join(f"(frame_start >= {a} AND frame_end <= {b})" for a, b in ranges)
        clause += f" AND ({starts}) AND ({inside})"
    return clause


class BlockTable:
    """The lancedb table of a store.

    Args:
        files: the store root.
        vector_dim: V.
        read_only: never create or change the table; see every new commit.
        vector_index_rows: build an IVF_PQ index once the table has this many
            rows (``None``: never, exact search only).
        exact_rows: a search over at most this many blocks of a stream's level (its ``below``)
            scans them exactly even where the index exists (``None``: the index, once built,
            for every search).
        optimize_every: compact fragments and update indexes every this many commits.
        cache_bytes: lance's index cache (its metadata cache gets a quarter of it), so a
            long stream does not grow the process's memory; ``None``: lance's defaults.
        call_timeout: seconds a write, search or read of rows may take before it raises a
            :class:`StoreError` (:func:`within_seconds`); ``None``: wait as long as it takes.
    """

    def __init__(self, files: Files, vector_dim: int, read_only: bool = False,
                 vector_index_rows: int | None = 100_000, scalar_index_rows: int = 20_000,
                 optimize_every: int = 32, nprobes: int = 32, refine_factor: int = 4,
                 cache_bytes: int | None = 256 << 20, call_timeout: float | None = None,
                 exact_rows: int | None = None):
        import lancedb  # heavy; only when a disk store is opened

        self.files = files
        self.vector_dim = vector_dim
        self.read_only = read_only
        self.vector_index_rows = vector_index_rows
        self.scalar_index_rows = scalar_index_rows
        self.optimize_every = optimize_every
        self.nprobes = nprobes
        self.refine_factor = refine_factor
        self.exact_rows = exact_rows
        opts: dict[str, Any] = {}
        if files.storage_options:
            opts["storage_options"] = lance_storage_options(files.storage_options)
        if read_only:
            opts["read_consistency_interval"] = timedelta(0)  # always see the writer's latest commit
        #: lance's caches (``size_bytes()``), when bounded here
        self.session = None
        if cache_bytes is not None and hasattr(lancedb, "Session"):  # bound lance's index/metadata caches
            self.session = opts["session"] = lancedb.Session(
                index_cache_size_bytes=int(cache_bytes), metadata_cache_size_bytes=max(1 << 20, int(cache_bytes) // 4))
        try:
            self.db = lancedb.connect(files.uri("index"), **opts)
        except Exception as exc:
            raise StoreError(f"{files.uri('index')}: cannot open the lancedb index ({exc})") from None
        self.call_timeout = call_timeout
        self._table = None
        self._commits = 0
        self._has_vector_index: bool | None = None
        self._has_scalar_index: bool | None = None

    def _call(self, what: str, fn):
        """A call into lance that a stream waits on, as a :class:`StoreError` if it fails or hangs."""
        uri = self.files.uri("index")
        with lance_errors(uri, what):
            return within_seconds(fn, self.call_timeout, what, uri)

    # -- table ------------------------------------------------------------------------
    def table(self, create: bool = False):
        if self._table is not None:
            return self._table
        try:
            self._table = self.db.open_table(TABLE)
        except (FileNotFoundError, ValueError) as exc:
            if "not found" not in str(exc).lower() and "was not found" not in str(exc).lower() \
                    and not isinstance(exc, FileNotFoundError):
                raise StoreError(f"{self.files.uri('index')}: cannot open table {TABLE!r} ({exc})") from None
            if not create or self.read_only:
                return None
            # writers of several streams may make their first commit at once: one creates the table, the
            # others open it (two concurrent creations can even overwrite each other's first rows in lance)
            with self._creation_lock(), lance_errors(self.files.uri("index"), f"creating table {TABLE!r}"):
                try:
                    self._table = self.db.open_table(TABLE)  # created meanwhile
                except (FileNotFoundError, ValueError):
                    try:
                        self._table = self.db.create_table(TABLE, schema=schema(self.vector_dim))
                    except (ValueError, OSError, RuntimeError) as exc:  # created meanwhile (another process)
                        if "already exists" not in str(exc).lower():
                            raise
                        self._table = self.db.open_table(TABLE)
        except Exception as exc:  # a damaged table (e.g. a manifest that cannot be read)
            raise StoreError(f"{self.files.uri('index')}: cannot open table {TABLE!r} ({exc}); run "
                             "`mukv inspect --verify` to see what is damaged") from None
        field = self._table.schema.field("vector")
        if field.type.list_size != self.vector_dim:
            raise StoreError(f"{self.files.uri('index')}: block vectors have {field.type.list_size} dims; "
                             f"this model's have {self.vector_dim}")
        return self._table

    @contextlib.contextmanager
    def _store_lock(self, name: str, wait: bool = True) -> Iterator[bool]:
        """An exclusive ``flock`` on ``streams/<name>`` between the writers of a local store; yields
        whether this writer holds it (without ``wait``, False when another one does). Object stores
        have no lock: there it yields True."""
        if self.files.remote:
            yield True
            return
        import fcntl
        import os

        path = self.files.local / "streams" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        held = False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                held = True
            except BlockingIOError:
                pass
            yield held
        finally:
            if held:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _creation_lock(self):
        """Serialise the creation of the table between writers of a local store (``streams/.index.lock``).
        Object stores have no lock: there, let one stream commit first."""
        return self._store_lock(".index.lock")

    # -- writing ------------------------------------------------------------------------
    def add(self, rows) -> None:
        """Append a pyarrow table of rows in one commit."""
        tbl = self.table(create=True)
        self._call("writing index rows", lambda: tbl.add(rows))
        self._commits += 1

    def has_column(self, name: str) -> bool:
        """Whether the table has column ``name`` (a table created by this mukv has every column of
        :func:`schema`; an older store's table may lack ``txn``). True while no table exists yet."""
        tbl = self.table()
        return tbl is None or name in tbl.schema.names

    @staticmethod
    def _uncounted(stream_id: str, counts: dict[str, int]) -> str:
        keep = " OR ".join(f"(level = '{check_level(lv)}' AND block_id < {int(n)})" for lv, n in counts.items() if n > 0)
        return f"stream_id = '{check_stream_id(stream_id)}'" + (f" AND NOT ({keep})" if keep else "")

    def beyond(self, stream_id: str, counts: dict[str, int], columns: list[str]):
        """The stream's rows beyond ``counts`` (levels not in ``counts``: every row), ``columns`` only."""
        tbl = self.table()
        if tbl is None:
            return None
        clause = self._uncounted(stream_id, counts)
        return self._call(f"reading uncounted rows of stream {stream_id!r}",
                          lambda: self._query(tbl.search().where(clause), columns, None))

    def delete_uncounted(self, stream_id: str, counts: dict[str, int]) -> int:
        """Delete the stream's rows beyond ``counts`` (a killed writer's leftovers, or a rolled-back
        transaction's rows). Returns rows deleted."""
        tbl = self.table()
        if tbl is None:
            return 0
        clause = self._uncounted(stream_id, counts)
        with lance_errors(self.files.uri("index"), f"removing uncommitted rows (stream {stream_id!r})"):
            n = tbl.count_rows(clause)
            if n:
                tbl.delete(clause)
        return n

    def restore_readable(self, counts: dict[str, dict[str, int]], max_versions: int = 64) -> tuple[int, int] | None:
        """Go back to the newest version of the table that can be read whole and holds every committed row
        (writers only; the caller makes sure no other process writes the store).

        A copy of a store taken while it was being written can hold a version of the
        table that references a data file written after that folder was copied. The
        rows the copy's stream states count were committed before those states were
        written, so an older version holds them all.

        Args:
            counts: committed blocks per level of every stream of the store.

        Returns:
            ``(latest version, version restored)``, or ``None`` (nothing changed) if the
            latest version is readable or no older version is readable and complete.
        """
        tbl = self.table()
        if tbl is None or self.read_only:
            return None
        try:
            versions = sorted((v["version"] for v in tbl.list_versions()), reverse=True)
        except Exception:  # noqa: BLE001
            return None
        if not versions or self._readable(tbl):
            return None
        try:
            for v in versions[1:max_versions]:
                try:
                    tbl.checkout(v)
                except Exception:  # noqa: BLE001 - that version's manifest is gone too
                    continue
                if self._readable(tbl) and self._holds(tbl, counts):
                    with lance_errors(self.files.uri("index"), f"restoring version {v} of the table"):
                        tbl.restore()
                    self._has_vector_index = self._has_scalar_index = None
                    return versions[0], v
        finally:
            try:
                tbl.checkout_latest()
            except Exception:  # noqa: BLE001
                pass
        return None

    @staticmethod
    def _holds(tbl, counts: dict[str, dict[str, int]]) -> bool:
        """Whether the checked-out version has a row for every committed block of every stream."""
        try:
            return all(tbl.count_rows(where(sid, level, n)) == n
                       for sid, levels in counts.items() for level, n in levels.items() if n > 0)
        except Exception:  # noqa: BLE001
            return False

    def rows_of_readable_version(self, stream_id: str | None, columns: list[str], max_versions: int = 64):
        """``(latest version, version read, rows)`` of the newest older version of the table that can be read
        whole (nothing is written), or ``None``."""
        tbl = self.table()
        if tbl is None:
            return None
        try:
            versions = sorted((v["version"] for v in tbl.list_versions()), reverse=True)
        except Exception:  # noqa: BLE001
            return None
        try:
            for v in versions[1:max_versions]:
                try:
                    tbl.checkout(v)
                    return versions[0], v, self.rows(stream_id, columns)
                except Exception:  # noqa: BLE001 - not readable either: an older one
                    continue
            return None
        finally:
            try:
                tbl.checkout_latest()
            except Exception:  # noqa: BLE001
                pass

    @staticmethod
    def _readable(tbl) -> bool:
        """Whether every data file of the checked-out version can be read (one small column of every row)."""
        try:
            tbl.search().select(["block_id"]).limit(2**31 - 1).to_arrow()
            return True
        except Exception:  # noqa: BLE001
            return False

    def maintain(self) -> None:
        """Compact fragments, update indexes, build them once the table is large (writer thread).
        One writer of a local store at a time (``streams/.upkeep.lock``): a writer that finds another
        one at it skips its turn, instead of compacting the shared table concurrently (lance drops
        all but one of concurrent compactions: wasted work)."""
        tbl = self.table()
        if tbl is None:
            return
        with self._store_lock(".upkeep.lock", wait=False) as mine:
            if mine:
                self._maintain(tbl)

    def _maintain(self, tbl) -> None:
        rows = None
        if self._commits and self._commits % self.optimize_every == 0:
            try:
                tbl.optimize(cleanup_older_than=timedelta(minutes=5))
            except AttributeError:  # very old lancedb
                tbl.compact_files()
        if self._has_scalar_index is None or self._has_vector_index is None:
            self._read_indices(tbl)
        if not self._has_scalar_index:
            rows = tbl.count_rows() if rows is None else rows
            # another writer of the store may have built them since this one last looked
            if rows >= self.scalar_index_rows and not self._read_indices(tbl)[0]:
                self.build_scalar_indexes()
        if not self._has_vector_index and self.vector_index_rows is not None:
            rows = tbl.count_rows() if rows is None else rows
            if rows >= self.vector_index_rows and not self._read_indices(tbl)[1]:
                self.build_vector_index(rows)

    def _read_indices(self, tbl) -> tuple[bool, bool]:
        """Whether the table has its scalar and vector indexes now (and remember it)."""
        names = " ".join(str(i) for i in tbl.list_indices())
        self._has_scalar_index = "block_id" in names
        self._has_vector_index = "vector" in names
        return self._has_scalar_index, self._has_vector_index

    def build_scalar_indexes(self) -> None:
        """BTREE on block ids and frame starts, BITMAP on stream ids and levels (fast filters)."""
        tbl = self.table()
        for col, kind in (("block_id", "BTree"), ("frame_start", "BTree"), ("stream_id", "Bitmap"), ("level", "Bitmap")):
            try:
                import lancedb.index as li

                tbl.create_index(col, config=getattr(li, kind)(), replace=True)
            except (ImportError, AttributeError, TypeError):  # older lancedb
                tbl.create_scalar_index(col, replace=True)
        self._has_scalar_index = True

    def build_vector_index(self, rows: int | None = None) -> None:
        """IVF_PQ over the vectors, cosine: sqrt(n) partitions, sub-vectors of 8 dims."""
        tbl = self.table()
        rows = tbl.count_rows() if rows is None else rows
        v = self.vector_dim
        sub = next(s for s in (v // 8, v // 4, v // 2, v, 1) if s >= 1 and v % s == 0)
        parts = int(min(4096, max(8, math.sqrt(rows))))
        try:
            from lancedb.index import IvfPq

            tbl.create_index("vector", config=IvfPq(distance_type="cosine", num_partitions=parts,
                                                    num_sub_vectors=sub), replace=True)
        except (ImportError, TypeError):  # older lancedb
            tbl.create_index(metric="cosine", num_partitions=parts, num_sub_vectors=sub,
                             vector_column_name="vector", index_type="IVF_PQ", replace=True)
        self._has_vector_index = True

    # -- reading ------------------------------------------------------------------------
    def count(self, stream_id: str, level: str, below: int | None = None) -> int:
        tbl = self.table()
        if tbl is None:
            return 0
        clause = _stream_level(stream_id, level) + ("" if below is None else f" AND block_id < {int(below)}")
        return self._call(f"counting {level} rows of stream {stream_id!r}", lambda: tbl.count_rows(clause))

    def levels(self, stream_id: str) -> dict[str, int]:
        """Rows per level of a stream (used by :meth:`verify` and recovery)."""
        tbl = self.table()
        if tbl is None:
            return {}
        clause = f"stream_id = '{check_stream_id(stream_id)}'"
        t = self._call(f"reading rows of stream {stream_id!r}",
                       lambda: self._query(tbl.search().where(clause), ["level"], None))
        out: dict[str, int] = {}
        for lv in t.column("level").to_pylist():
            out[lv] = out.get(lv, 0) + 1
        return out

    def search(self, stream_id: str, level: str, below: int, query: np.ndarray, k: int,
               within: np.ndarray | None = None, columns: list[str] | None = None):
        """Top-``k`` rows by cosine similarity (best first), as a pyarrow table with ``vector``."""
        tbl = self.table()
        if tbl is None or k <= 0 or below <= 0:
            return None
        q = (tbl.search(np.asarray(query, dtype=np.float32), vector_column_name="vector")
             .distance_type("cosine").where(where(stream_id, level, below, within), prefilter=True))
        # set whether or not this handle has seen the index: a reopened or read-only store learns of it only
        # at its first upkeep, and without these lance would search an existing index at its own defaults
        # (fewer probes, no refinement); on a table without an index both are a plain scan
        if self.exact_rows is not None and below <= self.exact_rows:
            q = q.bypass_vector_index()  # exact and reproducible (see the module's docstring)
        else:
            q = q.nprobes(self.nprobes).refine_factor(self.refine_factor)
        cols = (columns or META_COLUMNS) + ["vector", "_distance"]
        return self._call(f"searching {level} blocks of stream {stream_id!r}", lambda: self._query(q, cols, int(k)))

    def scan(self, stream_id: str, level: str, below: int, within: np.ndarray | None = None,
             columns: list[str] | None = None, limit: int | None = None):
        """Rows matching the filter, no ranking (for small ``within`` sets).

        With ``within`` and no ``limit``, ``block_id < below`` is applied to the rows read rather than
        in lance's filter: there it would make lance intersect the frame-range rows with every row
        below ``below`` (the whole level), several times slower than the frame-range lookup itself.
        """
        tbl = self.table()
        if tbl is None or below <= 0:
            return None
        cols = list(dict.fromkeys(["block_id", *(columns or META_COLUMNS), "vector"]))
        after = within is not None and limit is None
        clause = where(stream_id, level, None if after else below, within)
        t = self._call(f"reading {level} blocks of stream {stream_id!r}",
                       lambda: self._query(tbl.search().where(clause), cols, limit))
        if after:
            import pyarrow.compute as pc

            t = t.filter(pc.less(t.column("block_id"), int(below)))
        return t

    def fetch(self, stream_id: str, level: str, ids: np.ndarray, columns: list[str]):
        """Rows of block ``ids`` (unique ints), in ascending id order."""
        tbl = self.table()
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if tbl is None or ids.size == 0:
            return None
        lo, hi = int(ids[0]), int(ids[-1])
        if hi - lo + 1 == ids.size:
            clause = f"{_stream_level(stream_id, level)} AND block_id >= {lo} AND block_id <= {hi}"
        else:
            clause = f"{_stream_level(stream_id, level)} AND block_id IN ({', '.join(str(int(i)) for i in ids)})"
        cols = list(dict.fromkeys(["block_id", *columns]))
        t = self._call(f"reading {level} blocks of stream {stream_id!r}",
                       lambda: self._query(tbl.search().where(clause), cols, int(ids.size)))
        return t.sort_by("block_id")

    def rows(self, stream_id: str | None, columns: list[str]):
        """Every row of one stream (or of the whole table), ``columns`` only (:func:`~.verify.verify_store`)."""
        tbl = self.table()
        if tbl is None:
            return None
        q = tbl.search()
        if stream_id is not None:
            q = q.where(f"stream_id = '{check_stream_id(stream_id)}'")
        with lance_errors(self.files.uri("index"), "reading every row" if stream_id is None
                          else f"reading the rows of stream {stream_id!r}"):
            return self._query(q, columns, None)

    def rows_by_fragment(self, columns: list[str], chunk: int = 4096, max_probes: int = 1 << 20):
        """Read the table fragment by fragment, so that a fragment whose data file is gone loses only its own rows.

        Fragments are found by their ids (lance row ids are ``fragment << 32 | offset``), up to the number of
        fragments the table's latest version has.

        Returns:
            ``(rows, missing, complete)``: a pyarrow table of the readable rows (``columns``), one line per
            fragment that cannot be read (its error), and whether every fragment was found.
        """
        import pyarrow as pa

        tbl = self.table()
        if tbl is None:
            return None, [], True
        if not hasattr(tbl, "take_row_ids"):  # lancedb too old to read by row id
            return None, ["this lancedb cannot read a table fragment by fragment"], False
        try:
            versions = tbl.list_versions()
            latest = max(versions, key=lambda v: v["version"]) if versions else {}
            fragments = int(latest.get("metadata", {}).get("total_fragments", -1))
        except Exception:  # noqa: BLE001 - without the count we probe until max_probes
            fragments = -1
        parts, missing, found = [], [], 0
        for fid in range(max_probes):
            if 0 <= fragments <= found:
                break
            offset, seen = 0, False
            while True:
                ids = [(fid << 32) | o for o in range(offset, offset + chunk)]
                try:
                    t = tbl.take_row_ids(ids).select(columns).to_arrow()
                except Exception as exc:  # noqa: BLE001 - the fragment's data cannot be read
                    missing.append(f"fragment {fid}: {str(exc).split(', /', 1)[0]}")
                    seen = True
                    break
                if t.num_rows == 0:
                    break
                seen = True
                parts.append(t.select(columns))
                offset += chunk
            found += seen
        rows = pa.concat_tables(parts) if parts else None
        return rows, missing, fragments < 0 or found >= fragments

    @staticmethod
    def _query(q, columns: list[str], limit: int | None):
        q = q.select(columns)
        # a plain query without limit returns only 10 rows in lancedb; ask for all explicitly
        return q.limit(limit if limit is not None else 2**31 - 1).to_arrow()
