"""Where a benchmark process's memory is: resident set size and its parts (shared by
``soak.py`` and ``scale_week.py``; imported from the benchmarks folder, which is on
``sys.path`` when a script of it runs)."""

from __future__ import annotations

import os


def rss_bytes() -> int:
    """Resident set size of this process (psutil if installed, else /proc/self/statm)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_parts(backend=None) -> dict[str, float]:
    """Where the process's resident memory is (bytes): anonymous vs file-backed pages (/proc), glibc's heap
    (in use / free but kept, its arena count), Arrow's pool, lance's caches, the backend's row cache."""
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(val.split()[0]) * 1024
    try:
        import ctypes

        class Mallinfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Mallinfo2
        m = libc.mallinfo2()
        out["glibc_in_use"] = m.uordblks + m.hblkhd
        out["glibc_free_kept"] = m.fordblks
        from mukv.malloc import arena_count

        out["malloc_arenas"] = arena_count()
    except (OSError, AttributeError):
        pass
    try:
        import pyarrow as pa

        out["arrow_pool"] = pa.total_allocated_bytes()
    except ImportError:
        pass
    if backend is not None:
        out["row_cache_rows"], out["lance_caches"] = backend_caches(backend)
    return out


def backend_caches(backend) -> tuple[int, int]:
    """A ``lancedb`` backend's bounded caches: ``(rows in its row cache, bytes in lance's caches)``."""
    session = getattr(backend.table, "session", None)
    return len(backend._rows), int(session.size_bytes) if session is not None else 0
