"""glibc's allocator, tuned for a process that holds video memory for days.

Two process-wide settings keep a long stream's resident memory bounded (docs/hardening.md):

* **the arena cap**, applied when ``mukv`` is imported: glibc gives each new thread its own
  malloc arena (up to 8 per core), and MiB-sized buffers freed in an arena stay resident there
  as free-but-kept memory. With the disk tier's threads (lance's runtime, page-in readers,
  offload writers, torch's) that memory grew by 140-200 MiB in 7 minutes of GPU streams. glibc
  fixes its arena limit for good once a ninth arena exists, so a cap set later (when a store
  opens) does nothing on a many-core machine; it has to come before the threads, which is why
  the import sets it. The environment chooses it:

  ``MUKV_MALLOC_ARENA_MAX``
      unset: 2 arenas; a whole number >= 1: that many; ``0``: leave glibc's default. When
      glibc's own ``MALLOC_ARENA_MAX`` is set, it rules and mukv sets nothing.

* **the mmap threshold**, applied when a disk store opens (its ``malloc_mmap_threshold``
  option): allocations from that size get their own mmap, returned to the system when freed.

Without glibc (macOS, musl) both are no-ops.
"""

from __future__ import annotations

import ctypes
import functools
import os

from .errors import ConfigError

#: glibc ``mallopt`` parameters.
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8
#: the arena cap mukv sets at import when the environment says nothing.
DEFAULT_ARENA_MAX = 2
ENV_ARENA_MAX = "MUKV_MALLOC_ARENA_MAX"

#: ``mallopt`` settings made by this process through mukv: {param: value}
applied: dict[int, int] = {}


@functools.cache
def _libc():
    """glibc, with the signatures used here set once; None elsewhere (macOS, musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018  (glibc has it; musl's libc.so.6 does not exist)
    except (OSError, AttributeError):
        return None
    libc.open_memstream.restype = ctypes.c_void_p
    libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def mallopt(param: int, value: int) -> bool:
    """``mallopt(param, value)``, once per value. Returns whether it is in effect (False without
    glibc or when glibc refuses the value)."""
    if applied.get(param) == value:
        return True
    libc = _libc()
    if libc is None or not libc.mallopt(param, int(value)):
        return False
    applied[param] = value
    return True


def pin_mmap_threshold(nbytes: int) -> bool:
    """Make glibc serve allocations of at least ``nbytes`` with their own mmap, given back on free
    (``mallopt(M_MMAP_THRESHOLD)``). Returns whether it is in effect.

    glibc raises this threshold by itself up to 32 MiB after the first big buffer is freed; from
    then on the KV batches and shards that ingest allocates and the offload writer frees (MiBs
    each, from several threads) come from the heap arenas, and what they free stays there: a
    week-long stream's RSS grew by ~1 GB of such free-but-kept heap (docs/disk-tier-results.md).
    """
    return mallopt(M_MMAP_THRESHOLD, nbytes)


def cap_arenas(n: int) -> bool:
    """Let glibc create at most ``n`` malloc arenas (``mallopt(M_ARENA_MAX)``). Returns whether glibc
    took the value; it has an effect only while the process has at most 8 arenas (see the module)."""
    return mallopt(M_ARENA_MAX, n)


def arena_max_from_environment(environ=os.environ) -> int | None:
    """The arena cap the environment asks mukv for: ``None`` when glibc's ``MALLOC_ARENA_MAX`` is set
    or ``MUKV_MALLOC_ARENA_MAX`` is 0, else the cap (default 2).

    Raises:
        ConfigError: ``MUKV_MALLOC_ARENA_MAX`` is not a whole number from 0 to 1024.
    """
    if environ.get("MALLOC_ARENA_MAX"):
        return None
    raw = environ.get(ENV_ARENA_MAX, "").strip()
    if not raw:
        return DEFAULT_ARENA_MAX
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if not 0 <= n <= 1024:
        raise ConfigError(f"{ENV_ARENA_MAX}={raw!r} is not a whole number from 0 to 1024 (0: leave glibc's "
                          f"default; unset: {DEFAULT_ARENA_MAX})")
    return n or None


def apply_environment() -> int | None:
    """Set the arena cap the environment asks for (called by ``import mukv``). Returns the cap in
    effect through mukv, or None."""
    n = arena_max_from_environment()
    return n if n is not None and cap_arenas(n) else None


def arena_count() -> int | None:
    """How many malloc arenas the process has now (from ``malloc_info``); None without glibc."""
    libc = _libc()
    if libc is None:
        return None
    buf, size = ctypes.c_void_p(), ctypes.c_size_t()
    stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    if not stream:
        return None
    try:
        libc.malloc_info(0, stream)
    finally:
        libc.fclose(stream)
    try:
        return ctypes.string_at(buf, size.value).count(b"<heap nr=")
    finally:
        libc.free(buf)
