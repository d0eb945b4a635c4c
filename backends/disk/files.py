"""Where a disk store lives, and the few small files it keeps besides KV and index.

A store is a local directory or an object-store URI (``s3://bucket/prefix``)::

    <root>/mukv.json                    manifest: format version, KV layout, model id
    <root>/index/blocks.lance/          lancedb table: one row per block, every stream
    <root>/kv/<stream>/<level>.zarr/    zarr array [N, Y, 2, H, K, D] (or [N, S] rows of a KV codec), sharded
    <root>/kv/<stream>/<level>@<i>.zarr/  blocks from id i on, written with another KV codec
    <root>/streams/<stream>.json        committed state of a stream (counts, cursors, ...)
    <root>/streams/<stream>.lock        advisory writer lock (local stores only)

This module validates names that become paths or filter literals
(:func:`check_stream_id`, :func:`check_level`), reads and writes the small
JSON files atomically (a local temp file + ``os.replace``, or one object PUT),
and holds the writer lock. No KV bytes move here.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import uuid
from pathlib import Path
from typing import Any

from mukv.errors import StoreError
from mukv.safeio import MAX_SMALL_BYTES, parse_json_object, read_small

FORMAT = "mukv-store"
#: 2: index rows carry the number of the transaction that wrote them (``txn``), states count transactions.
FORMAT_VERSION = 2

_STREAM_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_LEVEL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

#: storage_options keys that configure the HTTP client rather than the bucket (object_store names).
_CLIENT_KEYS = {"allow_http", "allow_invalid_certificates", "timeout", "connect_timeout", "proxy_url",
                "pool_idle_timeout", "pool_max_idle_per_host", "http1_only", "http2_only", "user_agent"}


def check_stream_id(stream_id: Any) -> str:
    """Return ``stream_id`` if it is a safe stream id, else raise :class:`StoreError`.

    A stream id becomes a folder name and a lancedb filter literal, so only
    ``[A-Za-z0-9_.-]`` (1 to 128 characters, not starting with ``.`` or ``-``,
    no ``..``) is accepted: no path separators, quotes, spaces or SQL.
    """
    # fullmatch, not match: the pattern's "$" also matches before a trailing newline
    if not isinstance(stream_id, str) or not _STREAM_RE.fullmatch(stream_id) or ".." in stream_id:
        raise StoreError(
            f"invalid stream id {stream_id!r}: use 1-128 characters of [A-Za-z0-9_.-], starting with a "
            "letter, digit or underscore, without '..'")
    return stream_id


def check_level(level: Any) -> str:
    """Return ``level`` if it is a valid level name (``[A-Za-z_][A-Za-z0-9_]*``), else raise."""
    if not isinstance(level, str) or not _LEVEL_RE.fullmatch(level):
        raise StoreError(f"invalid level name {level!r}: use [A-Za-z_][A-Za-z0-9_]* (at most 64 characters)")
    return level


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` other than ``file://``."""
    return "://" in path and not path.startswith("file://")


def split_storage_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split lancedb-style ``storage_options`` into (bucket config, HTTP client options) for obstore."""
    config, client = {}, {}
    for key, value in options.items():
        k = key.lower()
        if k in _CLIENT_KEYS or (k.startswith("aws_") and k[4:] in _CLIENT_KEYS):
            name = k[4:] if k.startswith("aws_") else k
            client[name] = value if not isinstance(value, str) or name != "allow_http" else value.lower() == "true"
        else:
            config[k] = value
    return config, client


def lance_storage_options(options: dict[str, Any]) -> dict[str, str]:
    """lancedb wants every storage option as a string."""
    return {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in options.items()}


class Files:
    """Small-file access under a store root (local directory or object store).

    Args:
        root: local directory or URI.
        storage_options: object-store credentials and endpoint (lancedb names:
            ``aws_access_key_id``, ``aws_secret_access_key``, ``aws_endpoint``,
            ``aws_region``, ``allow_http`` ...).
        fsync: fsync files (and their folder) after writing them (local only).
    """

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None, fsync: bool = False):
        self.root = root.rstrip("/") if is_uri(root) else root
        self.remote = is_uri(root)
        self.fsync = fsync
        self.storage_options = dict(storage_options or {})
        self._store = None
        if self.remote:
            from obstore.store import from_url

            config, client = split_storage_options(self.storage_options)
            try:
                self._store = from_url(self.root, config=config or None, client_options=client or None)
            except Exception as exc:  # obstore raises its own types
                raise StoreError(f"{root}: cannot open object store ({exc})") from None
        else:
            self.local = Path(root[len("file://"):] if root.startswith("file://") else root)

    # -- paths ------------------------------------------------------------------------
    def uri(self, rel: str = "") -> str:
        """Absolute location of ``rel`` (a URI or a local path string)."""
        if not rel:
            return self.root if self.remote else str(self.local)
        return f"{self.root}/{rel}" if self.remote else str(self.local / rel)

    @property
    def object_store(self):
        """The obstore store of a remote root (``None`` for local)."""
        return self._store

    # -- small files ------------------------------------------------------------------
    def read(self, rel: str, max_bytes: int = MAX_SMALL_BYTES) -> bytes | None:
        """Bytes of ``rel``, or ``None`` if it does not exist.

        Only regular files of at most ``max_bytes`` are read: a FIFO, a device, a symlink loop or an
        oversized object in a store is a :class:`StoreError`, never a hang or an unbounded read.
        """
        if self.remote:
            import obstore

            try:
                res = obstore.get(self._store, rel)
                size = int(res.meta["size"])
                if size > max_bytes:
                    raise StoreError(f"{self.uri(rel)}: too large ({size:,} bytes; at most {max_bytes:,})")
                return bytes(res.bytes())
            except StoreError:
                raise
            except FileNotFoundError:
                return None
            except Exception as exc:
                if "not found" in str(exc).lower() or "NotFound" in type(exc).__name__:
                    return None
                raise StoreError(f"{self.uri(rel)}: cannot read ({exc})") from None
        return read_small(self.local / rel, "file", max_bytes, StoreError, missing_ok=True)

    def delete(self, rel: str) -> None:
        """Remove the file ``rel`` (no error if it is gone)."""
        if self.remote:
            import obstore

            try:
                obstore.delete(self._store, rel)
            except FileNotFoundError:
                pass
            except Exception as exc:
                if "not found" not in str(exc).lower():
                    raise StoreError(f"{self.uri(rel)}: cannot delete ({exc})") from None
            return
        try:
            (self.local / rel).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise disk_error(exc, f"deleting {self.local / rel}") from None

    def write(self, rel: str, data: bytes) -> None:
        """Replace ``rel`` atomically: readers see the old or the new bytes, never a mix."""
        if self.remote:
            import obstore

            try:
                obstore.put(self._store, rel, data)
            except Exception as exc:  # obstore raises its own types
                raise StoreError(f"{self.uri(rel)}: cannot write ({exc})") from None
            return
        p = self.local / rel
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a parent that cannot be made (read-only, /proc, a file in the way)
            raise disk_error(exc, f"creating the folder {p.parent}") from None
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, p)
            if self.fsync:
                fd = os.open(p.parent, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise disk_error(exc, f"writing {p}") from None

    def read_json(self, rel: str, max_bytes: int = MAX_SMALL_BYTES) -> dict[str, Any] | None:
        """The JSON object in ``rel`` (``None`` if missing); see :func:`mukv.safeio.parse_json_object`."""
        raw = self.read(rel, max_bytes)
        if raw is None:
            return None
        return parse_json_object(raw, self.uri(rel))

    def write_json(self, rel: str, value: dict[str, Any]) -> None:
        self.write(rel, json.dumps(value, indent=1, sort_keys=True).encode())

    def listing(self, rel: str = "") -> list[str]:
        """Names directly under ``rel`` (files and folders); empty if missing."""
        if self.remote:
            import obstore

            prefix = f"{rel.rstrip('/')}/" if rel else None
            out = obstore.list_with_delimiter(self._store, prefix=prefix)
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in out["common_prefixes"]]
            names += [o["path"].rsplit("/", 1)[-1] for o in out["objects"]]
            return sorted(set(names))
        p = self.local / rel if rel else self.local
        try:
            return sorted(os.listdir(p))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists_nonempty_root(self) -> bool:
        """True if the root holds anything at all."""
        return bool(self.listing())


def tree_bytes(root: Path) -> int:
    """Bytes of the files under a local folder, skipping temp files of writes in flight (``*.partial``).

    A background writer may rename or remove a file between the listing and its ``stat``; such a file
    counts as gone (0 bytes), never as an error: this is a measurement taken while the store is written.
    """
    total = 0
    for folder, _dirs, names in os.walk(root):
        for name in names:
            if name.endswith(".partial"):
                continue
            try:
                st = os.stat(os.path.join(folder, name), follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def disk_error(exc: OSError, what: str) -> StoreError:
    """A :class:`StoreError` for an OS error, spelling out a full disk."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"disk full while {what}: {exc.strerror or exc}")
    return StoreError(f"I/O error while {what}: {exc}")


class WriterLock:
    """An advisory exclusive lock that marks the one process writing a stream.

    Local stores only (``flock`` on ``streams/<id>.lock``); it is released when
    the process ends, however it ends. Object stores have no lock: a lease kept
    in the stream's state file by conditional writes marks their writer
    (:mod:`~mukv.backends.disk.lease`).
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Try to take the lock; ``False`` if another process holds it."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
