"""Reading the small files mukv trusts least: manifests, stream states, checkpoint configs, option files.

Every such file may be hostile or damaged: a FIFO or a device where a file should be (``open`` blocks
forever, ``read`` never ends), a symlink loop, gigabytes of data, JSON nested a million levels deep.
:func:`read_small` refuses all of these without reading them unbounded, and :func:`read_json_object`
adds the JSON checks. Both raise the error class the caller names (a :class:`~mukv.errors.MukvError`),
with the path and the reason.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import MukvError, StoreError

#: Default size bound of a small file (state files carry a stream's memory history and sources).
MAX_SMALL_BYTES = 64 << 20
#: Deepest nesting accepted in a JSON file mukv reads (its own files nest about 6 levels).
MAX_JSON_DEPTH = 64

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def file_kind(mode: int) -> str:
    """What a file of ``st_mode`` is, in words ("a FIFO (named pipe)", "a regular file", ...)."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def read_small(path: str | os.PathLike, what: str = "file", max_bytes: int = MAX_SMALL_BYTES,
               error: type[MukvError] = StoreError, missing_ok: bool = False) -> bytes | None:
    """The bytes of a regular file of at most ``max_bytes``, read without blocking on special files.

    The file is opened non-blocking (a FIFO without a writer does not hang the open), checked to be a
    regular file through the open descriptor (no race with a rename), and read up to ``max_bytes + 1``.

    Args:
        path: the file.
        what: what the file is, for messages ("stream state", "checkpoint config").
        max_bytes: refuse larger files.
        error: the error class raised.
        missing_ok: return ``None`` for a missing file instead of raising.

    Raises:
        MukvError: (the class ``error`` names) missing (unless ``missing_ok``), not a regular file, too
            large, a symlink loop, unreadable.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if missing_ok:
            return None
        raise error(f"{p}: {what} not found") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(f"{p}: {what} is a symbolic link loop") from None
        if exc.errno == errno.EISDIR:
            raise error(f"{p}: {what} is a folder, not a file") from None
        if exc.errno in (errno.ENXIO, errno.ENODEV):  # a socket, a FIFO opened without a reader, a dead device
            raise error(f"{p}: {what} is not a regular file") from None
        raise error(f"{p}: cannot read {what} ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{p}: {what} is {file_kind(st.st_mode)}, not a regular file; refusing to read it")
        if st.st_size > max_bytes:
            raise error(f"{p}: {what} is too large ({st.st_size:,} bytes; at most {max_bytes:,})")
        chunks, total = [], 0
        while True:
            try:
                chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            except BlockingIOError:  # cannot happen for a regular file; never spin on it
                raise error(f"{p}: {what} cannot be read without blocking") from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # grew while being read
                raise error(f"{p}: {what} is too large (more than {max_bytes:,} bytes)")
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"{p}: cannot read {what} ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def json_depth_ok(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the brackets of a JSON text nest at most ``limit`` deep (strings skipped)."""
    depth = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def parse_json_object(raw: bytes | str, where: str, what: str = "file",
                      error: type[MukvError] = StoreError) -> dict[str, Any]:
    """Parse a JSON object (not an array or scalar), refusing bad UTF-8, bad JSON, deep nesting,
    NaN/Infinity literals and duplicate keys."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise error(f"{where}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not json_depth_ok(text):
        raise error(f"{where}: {what} nests deeper than {MAX_JSON_DEPTH} levels")

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    try:
        value = json.loads(text, parse_constant=no_constants, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: {what} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:
        raise error(f"{where}: {what} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise error(f"{where}: {what} must hold a JSON object; found {type(value).__name__}")
    return value


def read_json_object(path: str | os.PathLike, what: str = "file", max_bytes: int = MAX_SMALL_BYTES,
                     error: type[MukvError] = StoreError, missing_ok: bool = False) -> dict[str, Any] | None:
    """:func:`read_small` + :func:`parse_json_object`."""
    raw = read_small(path, what, max_bytes, error, missing_ok)
    if raw is None:
        return None
    return parse_json_object(raw, str(path), what, error)
