"""The disk tier: a bounded hot tier over zarr KV and a lancedb index, locally or on ``s3://``.

Registered as the ``lancedb`` storage backend (``mukv.Session(backend="lancedb", path=...)``).
Modules, one concern each:

* :mod:`.tiered`: the backend (bookkeeping: ids, counts, state, recovery, search merging);
* :mod:`.hot`: the hot tier (one preallocated arena, slots, eviction);
* :mod:`.zarr_kv`: KV bytes in sharded zarr arrays;
* :mod:`.shards`: direct reads of those shards (``preadv`` into the caller's buffer);
* :mod:`.lance_index`: the lancedb table of vectors and metadata;
* :mod:`.pagein`: page-in of a question's selection (hot copies, disk reads, crc checks, promotion);
* :mod:`.writer`: the background offload thread;
* :mod:`.transfer`: device/host copies (pinned buffers, side stream);
* :mod:`.files`: store layout, names, small files, the writer lock;
* :mod:`.options`: the backend's typed options;
* :mod:`.verify`: an end-to-end, read-only check of a store (:func:`verify_store`).

zarr, lancedb and pyarrow are imported only when a store is opened.
"""

from __future__ import annotations

import mukv

from .tiered import TieredBackend
from .verify import Problem, VerifyReport, verify_store

__all__ = ["TieredBackend", "verify_store", "VerifyReport", "Problem"]


@mukv.hookimpl
def mukv_register_backends(register):
    register("lancedb", TieredBackend)
