"""Options of the disk backend, typed and documented field by field.

Passed as ``mukv.Session(backend="lancedb", path=..., backend_options={...})``;
an unknown or invalid option raises :class:`mukv.errors.ConfigError` naming it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mukv.config import format_validation_error
from mukv.errors import ConfigError
from mukv.specs import component_ref

EvictorRef = component_ref("evictors")
IndexRef = component_ref("indexes")


class TieredOptions(BaseModel):
    """Options of the ``lancedb`` backend (hot tier + zarr KV + lancedb index)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    hot_bytes: int | None = Field(default=None, ge=0)
    """Hot-tier budget in bytes (GPU memory on CUDA, RAM otherwise), preallocated
    once. ``None``: 1 GiB on CUDA, 256 MiB on CPU. 0 disables the hot tier
    (every question pages in from disk)."""

    hot_slab_bytes: int | None = Field(default=None, ge=4096)
    """Bytes of one slab of the hot tier (a slab holds blocks of one level).
    ``None``: a sixteenth of ``hot_bytes``. Must hold at least one block of every level."""

    eviction: EvictorRef = "lru_segment"
    """Eviction policy (``mukv_register_evictors``): which hot blocks leave first.
    "lru_segment": least recently retrieved segment first. A registered name, a
    name with settings (``{"name": ..., setting: value}``), or an object."""

    index: IndexRef = "flat"
    """Vector index (``mukv_register_indexes``) searched over the hot tier's vectors
    (a name, or a name with settings)."""

    cold_index: Literal["auto", "exact"] = "exact"
    """Search of blocks on disk. "exact" (the default) scans a stream's level exactly: every
    stored block is ranked, and two runs of a stream retrieve the same blocks. "auto" scans
    exactly until the table holds ``cold_index_rows`` rows, then builds an IVF_PQ index
    (approximate, refined) for levels of more than ``cold_exact_rows`` blocks: faster at a week
    (semi-hierarchical retrieval 0.25 s against 0.64 s on two CPU cores) but it finds less of
    what exact search finds, and less as the stream grows: lance's upkeep (``optimize()``, every
    32 commits) adds rows to the index without training it again, and lancedb 0.39 and 0.40
    leave it a flat scan of PQ codes after a single upkeep. At a week the index returned 49% of
    the patch blocks exact search returned (``docs/disk-tier-results.md``)."""

    cold_index_rows: int = Field(default=100_000, ge=256)
    """Table size (rows, all streams) at which the IVF_PQ index is built."""

    cold_exact_rows: int | None = Field(default=500_000, ge=0)
    """With ``cold_index`` "auto": a search over a stream's level holding at most this many
    blocks scans them exactly even where the IVF_PQ index exists. Exact search is reproducible:
    lance trains the index's partitions by an unseeded k-means, so through the index two runs of one stream
    retrieved different blocks for about one question in five (measured at a day). It costs
    time in proportion to the level's blocks: the default covers about three days of a
    0.5-fps stream's patch blocks (172,800 a day); at a week (1.2 million) semi-hierarchical
    retrieval took 0.61-0.64 s exact against 0.25-0.26 s through the index on two CPU cores.
    The answer-quality harness sets it past any stream. ``None``: the index for every
    search once it is built."""

    lance_cache_bytes: int | None = Field(default=256 << 20, ge=1 << 20)
    """Bound of lancedb's index cache in bytes (its metadata cache: a quarter of it), so
    memory stays flat over a long stream; ``None``: lancedb's defaults (lancedb >= 0.2x with
    ``lancedb.Session``; ignored otherwise)."""

    lance_call_timeout: float | None = Field(default=300.0, gt=0)
    """Seconds a write of index rows, a search or a read of rows in lancedb may take before it
    raises a :class:`~mukv.errors.StoreError` naming the call, instead of the stream waiting
    forever: lance was seen to deadlock once (every thread parked) in a 22-minute soak of four
    writers and readers of one table (docs/hardening.md). Each such call runs on a short-lived
    daemon thread: 0.1-0.4 ms more per search on a 2-core machine (5.8 -> 5.9 ms,
    ``benchmarks/lance_call_timeout.py``). Index upkeep (compaction, index builds) is not timed.
    ``None``: wait as long as it takes, on the caller's thread."""

    malloc_mmap_threshold: int | None = Field(default=4 << 20, ge=128 << 10, le=32 << 20)
    """Bytes from which glibc gives an allocation its own mmap, returned to the system when freed
    (``mallopt(M_MMAP_THRESHOLD)``, set when a store is opened; process-wide; nothing without glibc).
    Without it glibc raises the threshold itself after the first big free, and the KV batches that
    ingest allocates and the offload writer frees stay in its heap as free but kept memory: a
    week-long stream's RSS grew ~1 GB that way. ``None``: leave glibc's default. (The other
    allocator setting, the arena cap, is made by ``import mukv``: see ``MUKV_MALLOC_ARENA_MAX``.)"""

    scan_frames: int = Field(default=4096, ge=0)
    """A search restricted to frame ranges (``within``) covering at most this
    many frames reads those rows and ranks them exactly instead of using the index."""

    storage_options: dict[str, Any] = Field(default_factory=dict)
    """Object-store settings for ``s3://`` stores, lancedb names
    (``aws_access_key_id``, ``aws_secret_access_key``, ``aws_endpoint``,
    ``aws_region``, ``allow_http``); used for lancedb and zarr alike."""

    shard_bytes: int = Field(default=16 << 20, ge=1)
    """Target bytes of one zarr shard (a file holding many blocks of a level)."""

    commit_interval: float = Field(default=2.0, ge=0.0, le=3600.0)
    """Seconds the offload writer lets blocks gather before one commit (longer:
    fewer shard rewrites and index fragments; shorter: less to lose in a crash)."""

    max_pending_bytes: int = Field(default=256 << 20, ge=1)
    """KV bytes that may wait for the offload writer before ``feed`` waits for it."""

    pinned_free_bytes: int = Field(default=256 << 20, ge=0)
    """On CUDA: page-locked host bytes kept free for reuse by offloads and page-ins. Pinned memory
    stays within the bytes in flight plus this; what is returned beyond it is freed at once (given
    back to the system). 0: free every staging buffer after its copy."""

    read_only: bool | None = None
    """``None``: write if no other process writes this stream, else open
    read-only; ``True``: read-only; ``False``: fail if another process writes it."""

    lease_ttl: float = Field(default=30.0, ge=1.0, le=3600.0)
    """Object stores: seconds a writer's lease on a stream lasts without renewal (renewed every
    third of it). A server that dies holding a stream leaves it to another after this long.
    See :mod:`~mukv.backends.disk.lease`."""

    lease_owner: str | None = Field(default=None, min_length=1, max_length=200)
    """Object stores: the name a writer gives itself in its lease (``None``: ``host:pid``)."""

    clock_skew: float = Field(default=10.0, ge=0.0, le=3600.0)
    """Object stores: seconds by which the clocks of the machines writing one store may differ. A
    lease whose recorded expiry is this long past is taken at once; otherwise a lease is taken
    after its state file was seen unchanged for a whole lease, which needs no clocks."""

    read_threads: int = Field(default=8, ge=1, le=256)
    """Threads that read KV at page-in (shards of one question's selection are read
    concurrently; the threads mostly wait for the disk, so more than the CPU cores)."""

    verify_reads: bool = True
    """Check each block's crc32 when it is paged in from disk."""

    fsync: bool = False
    """fsync state files after writing (power-loss safety; kill -9 safety does not need it)."""

    segment_frames: int | None = Field(default=None, ge=1)
    """Frames of one segment, the unit of eviction. ``None``: the largest
    ``frames`` of the session's levels (4 by default)."""

    promote: bool = True
    """Admit blocks paged in for a question into the hot tier."""

    hot_encoded: bool = False
    """Keep blocks in the hot tier as the KV codec stores them (``kv_codec``, e.g. int4: about 3.6x as
    many blocks in the same ``hot_bytes``) and decode them on the device when a question needs them;
    ``False``: keep them decoded (no decode for hot blocks). No effect with the "none" codec. Blocks
    of arrays written with another codec than the session's are then not promoted."""

    row_cache: int = Field(default=32768, ge=0)
    """Rows (vector + metadata) of cold blocks kept after a search, so the
    retriever's follow-up calls need no second index query."""

    min_free_bytes: int = Field(default=0, ge=0)
    """Refuse a batch (with :class:`StoreError`, nothing stored) when the local
    disk would have less than this many bytes free after it."""

    @classmethod
    def parse(cls, options: dict[str, Any]) -> "TieredOptions":
        unknown = sorted(set(options) - set(cls.model_fields))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown} for the lancedb backend; options: {sorted(cls.model_fields)}")
        try:
            return cls.model_validate(options)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc).replace("mukv configuration", "lancedb backend option")) from None
