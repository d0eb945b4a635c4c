"""Scale benchmark of the disk tier: a week-long stream at 0.5 fps through the ``lancedb`` backend.

    python benchmarks/scale_week.py                 # the full run (about 10-15 min on 2 cores)
    python benchmarks/scale_week.py --hours 2 --checkpoints 1,2 --full-hours 0   # a quick look
    python benchmarks/scale_week.py --path /data/wk --keep           # keep the stores, then measure them
    python benchmarks/scale_week.py --path /data/wk --reuse --parts full --out -  # again, without ingest
    python benchmarks/scale_week.py --parts full --full-hours 0.1 --codec int4 --layout 7b --skip-raw --out -
                                                    # KV codecs: bytes per stream-hour, page-in (issue 20)

What it simulates: 302,400 frames (168 h at 0.5 fps) of MuKV blocks of the
LLaVA-OneVision-0.5B shape (24 layers, 2 KV heads, head dim 64, bf16; per
4-frame window 16 patch blocks of K=4, 4 frame blocks of K=19, one segment
block of K=627), fed in batches through the real backend code (hot tier,
offload writer, zarr, lancedb), with synthetic KV bytes and clustered
synthetic vectors (no model runs).

How it is scaled down, and why: the real KV is ~2.3 MiB per frame, ~0.7 TB
for the week; this machine has ~80 GB of disk. So

* the **week stream** stores every block's metadata and vector (1.59 M index
  rows, exactly as at full scale) but KV of a **reduced layout with
  ``--layers`` layers** (default 1 of 24, everything else real): KV bytes are
  1/24 of the real ones, and disk bytes per hour are reported both as
  measured and extrapolated (KV x 24 + index as measured);
* a **full-layout stream** of ``--full-hours`` hours (default 1 h, real
  24 layers, ~4 GB) measures page-in at the real block sizes (~100 MB of KV
  per question) against the raw read bandwidth of this disk, measured in the
  same run on a fresh file with its page cache dropped (``posix_fadvise
  DONTNEED``); the KV files are dropped from the page cache the same way
  before every question, so page-in numbers are disk reads, not RAM copies.

Reported: hot-tier bytes (budget, held) and process RSS over stream time
(must stay flat), disk bytes per hour of video, retrieval and page-in latency
at 1 h, 24 h and 168 h stored (semi-hierarchical and hierarchical
retrievers, MuKV's top-k 20/32/12 with 2x over-retrieval), page-in bandwidth
against raw disk bandwidth. Results go to ``docs/disk-tier-results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("LANCE_LOG", "error")  # lance's Rust logs ("partition N is empty") flood the table otherwise
import torch  # noqa: E402
from memory_parts import memory_parts, rss_bytes  # noqa: E402

#: LLaVA-OneVision-0.5B's language model
REAL = dict(num_layers=24, num_kv_heads=2, head_dim=64)
#: the real KV layouts ``--layout`` chooses from (LLaVA-OneVision-0.5B's and -7B's language models)
LAYOUTS = {"0.5b": REAL, "7b": dict(num_layers=28, num_kv_heads=4, head_dim=128)}
#: per 4-frame window: (blocks, kept tokens K)
LEVELS = {"patch": (16, 4), "frame": (4, 19), "segment": (1, 627)}
TOP_K = {"patch": 20, "frame": 32, "segment": 12}
WINDOW = 4


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def drop_cache(path: Path) -> None:
    """Evict a folder's files from the page cache (so reads hit the disk)."""
    for p in path.rglob("*"):
        if p.is_file():
            try:
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            except OSError:
                pass


def raw_read_bandwidth(folder: Path, nbytes: int = 2 << 30, chunk: int = 8 << 20) -> float:
    """Sequential read bandwidth (bytes/s) of a fresh file, page cache dropped."""
    path = folder / "raw_bandwidth.bin"
    buf = np.random.default_rng(0).integers(0, 255, chunk, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        for _ in range(nbytes // chunk):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        total = 0
        while True:
            got = os.read(fd, chunk)
            if not got:
                break
            total += len(got)
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
        path.unlink()
    return total / dt


def raw_read_files(folder: Path, nbytes: int = 2 << 30, threads: int = 1, chunk: int = 8 << 20) -> float:
    """Read bandwidth (bytes/s) of the files under ``folder`` (sorted, whole files, up to ``nbytes``), page cache
    dropped: one after another with ``chunk`` reads (``threads=1``), or ``threads`` files at a time."""
    from concurrent.futures import ThreadPoolExecutor

    files, total = [], 0
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            files.append(p)
            total += p.stat().st_size
            if total >= nbytes:
                break
    drop_cache(folder)

    def read(p: Path) -> int:
        fd = os.open(p, os.O_RDONLY)
        try:
            got = 0
            while True:
                n = len(os.read(fd, chunk))
                if not n:
                    return got
                got += n
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        got = sum(pool.map(read, files))
    return got / (time.perf_counter() - t0)


def raw_read_pattern(backend, rng: np.random.Generator) -> float:
    """Bandwidth (bytes/s) of plain reads of what a question pages in: a random selection of MuKV's final
    top-k (12 segment, 32 frame, 20 patch blocks), each run of adjacent blocks read by one ``pread`` into a
    reused buffer, ``read_threads`` at a time, page cache dropped first; no shard index, no crc, no output
    tensor: the ceiling of page-in's access pattern on this disk."""
    from concurrent.futures import ThreadPoolExecutor

    threads = backend.options.read_threads
    ranges = []
    for level, k in TOP_K.items():
        ids = rng.choice(backend.count(level), k, replace=False)
        ranges += backend.archive.locate(level, ids) or []
    bufs = [bytearray(max(n for _, _, n in ranges)) for _ in range(threads)]
    drop_cache(backend.files.local / "kv")

    def read(i: int) -> int:
        path, offset, nbytes = ranges[i]
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.preadv(fd, [memoryview(bufs[i % threads])[:nbytes]], offset)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        got = sum(pool.map(read, range(len(ranges))))
        return got / (time.perf_counter() - t0)


def malloc_trim() -> int:
    """Hand glibc's free heap memory back to the system; returns the RSS drop in bytes."""
    import ctypes

    before = rss_bytes()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return 0
    return before - rss_bytes()


class Synth:
    """Synthetic blocks: KV sliced from a random pool, vectors around slowly drifting topics.

    The pool is Gaussian bf16 with two outlier channels of 20x per head (as RoPE'd keys have), sliced at
    offsets that keep the channels in place, so KV codecs see values like a model's (finite, scaled)."""

    POOL = 48 << 20  # values

    def __init__(self, layout, seed: int = 0):
        self.layout = layout
        rng = np.random.default_rng(seed)
        self.rng = rng
        d = layout.head_dim
        pool = torch.randn(self.POOL // d, d, generator=torch.Generator().manual_seed(seed))
        pool[:, [3, d // 2 + 1]] *= 20.0
        self.pool = pool.to(torch.bfloat16).reshape(-1)
        self.topics = rng.normal(size=(512, layout.vector_dim)).astype(np.float32)
        self.level_noise = {lv: rng.normal(size=layout.vector_dim).astype(np.float32) * 0.3 for lv in LEVELS}

    def topic_of(self, window: np.ndarray) -> np.ndarray:
        return (window // 150 * 7919 + window // 37) % len(self.topics)  # scenes of ~10 min with sub-scenes

    def blocks(self, level: str, first_window: int, n_windows: int, first_id: int):
        from mukv.blocks import CompressedBlocks

        per, k = LEVELS[level]
        lay = self.layout
        b = per * n_windows
        elems = lay.num_layers * 2 * lay.num_kv_heads * k * lay.head_dim
        if b * elems > self.pool.numel():
            raise ValueError(f"a batch of {b} {level} blocks ({b * elems:,} values) is larger than the synthetic pool")
        off = int(self.rng.integers(0, (self.pool.numel() - b * elems) // lay.head_dim + 1)) * lay.head_dim
        kv = self.pool[off : off + b * elems].view(b, lay.num_layers, 2, lay.num_kv_heads, k, lay.head_dim)
        window = first_window + np.arange(n_windows).repeat(per)
        frames_per_block = WINDOW if level == "segment" else 1
        if level == "segment":
            fs = window * WINDOW
        else:
            sub = np.tile(np.arange(per), n_windows)
            fs = window * WINDOW + (sub // (per // WINDOW) if level == "patch" else sub)
        vec = self.topics[self.topic_of(window)] + self.level_noise[level] + \
            self.rng.normal(scale=0.6, size=(b, lay.vector_dim)).astype(np.float32)
        kept = torch.arange(k).expand(b, k)
        fs_t = torch.from_numpy(fs.astype(np.int64))
        return CompressedBlocks(
            level=level, kv=kv, vectors=torch.from_numpy(vec), kept=kept, positions=kept + 20,
            frame_start=fs_t, frame_end=fs_t + frames_per_block, t_start=fs_t.double() * 2.0,
            t_end=(fs_t + frames_per_block - 1).double() * 2.0, token_index=kept,
        )


def feed(backend, synth: Synth, first_window: int, n_windows: int, batch: int) -> None:
    for w0 in range(first_window, first_window + n_windows, batch):
        nw = min(batch, first_window + n_windows - w0)
        for level in LEVELS:
            backend.add(synth.blocks(level, w0, nw, backend.count(level)))
        frames = (w0 + nw) * WINDOW
        backend.set_state("frames_seen", frames)


def questions(backend, synth: Synth, n: int, seed: int) -> list[torch.Tensor]:
    """Query vectors near the topic of a random stored moment."""
    rng = np.random.default_rng(seed)
    windows = backend.count("segment")
    out = []
    for _ in range(n):
        w = int(rng.integers(0, windows))
        v = synth.topics[synth.topic_of(np.array([w]))[0]] + rng.normal(scale=0.3, size=synth.layout.vector_dim)
        out.append(torch.from_numpy(v.astype(np.float32)))
    return out


def ask(backend, retriever, q: torch.Tensor, stored_frames: int, kv_root: Path | None,
        probe=None) -> dict[str, float]:
    from mukv.blocks import Query

    plan = {lv: min(k, backend.count(lv)) for lv, k in TOP_K.items()}
    t0 = time.perf_counter()
    hits = retriever.retrieve(Query("q", q, 0.0, stored_frames), backend, plan)
    t_ret = time.perf_counter() - t0
    if probe is not None:  # a raw read right before this page-in, under the same conditions
        probe()
    if kv_root is not None:
        drop_cache(kv_root)
    before = dict(backend.pagein)
    t0 = time.perf_counter()
    nbytes = 0
    for h in hits:
        if len(h):
            kv = backend.load_kv(h.level, h.ids)
            nbytes += kv.numel() * kv.element_size()
    t_pg = time.perf_counter() - t0
    disk_bytes = backend.pagein["bytes_disk"] - before["bytes_disk"]  # as stored (a codec's rows)
    decoded = backend.pagein.get("bytes_decoded", disk_bytes) - before.get("bytes_decoded", disk_bytes)
    decode_s = backend.pagein.get("seconds_decode", 0.0) - before.get("seconds_decode", 0.0)
    disk_s = backend.pagein["seconds_disk"] - before["seconds_disk"]
    read_s = backend.pagein.get("seconds_read", disk_s) - before.get("seconds_read", disk_s)
    return {"retrieve_s": t_ret, "pagein_s": t_pg, "bytes": nbytes, "disk_bytes": disk_bytes, "disk_s": disk_s,
            "read_s": read_s, "decoded_bytes": decoded, "decode_s": decode_s, "blocks": sum(len(h) for h in hits),
            "ids": {h.level: h.ids.tolist() for h in hits}}


def measure(backend, synth, retrievers, n_q: int, seed: int, kv_root: Path, probe=None) -> dict[str, dict[str, float]]:
    out = {}
    qs = questions(backend, synth, n_q, seed)
    stored = backend.count("segment") * WINDOW
    for name, r in retrievers.items():
        ask(backend, r, qs[0], stored, None)  # warm the code paths (not the data)
        rows = [ask(backend, r, q, stored, kv_root, probe) for q in qs]
        pg = [x["pagein_s"] for x in rows]
        out[name] = {
            "retrieve_ms_median": 1e3 * statistics.median(x["retrieve_s"] for x in rows),
            "retrieve_ms_p90": 1e3 * sorted(x["retrieve_s"] for x in rows)[int(0.9 * (len(rows) - 1))],
            "pagein_ms_median": 1e3 * statistics.median(pg),
            "pagein_ms_p90": 1e3 * sorted(pg)[int(0.9 * (len(pg) - 1))],
            "kv_mb_per_question": statistics.mean(x["bytes"] for x in rows) / 1e6,
            "disk_mb_per_question": statistics.mean(x["disk_bytes"] for x in rows) / 1e6,
            "pagein_gbps": sum(x["disk_bytes"] for x in rows) / max(1e-9, sum(x["disk_s"] for x in rows)) / 1e9,
            "pagein_gbps_decoded": sum(x["decoded_bytes"] for x in rows) / max(1e-9, sum(x["disk_s"] for x in rows)) / 1e9,
            "decode_ms_median": 1e3 * statistics.median(x["decode_s"] for x in rows),
            "read_gbps": sum(x["disk_bytes"] for x in rows) / max(1e-9, sum(x["read_s"] for x in rows)) / 1e9,
            "disk_gbps_per_question": [x["disk_bytes"] / max(1e-9, x["pagein_s"]) / 1e9 for x in rows],
            "blocks": [x["ids"] for x in rows],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring for how the run is scaled down.")
    ap.add_argument("--hours", type=float, default=168.0, help="stream length in hours of video (default 168 = a week)")
    ap.add_argument("--fps", type=float, default=0.5, help="sampled frames per second (default 0.5)")
    ap.add_argument("--layers", type=int, default=1, help="layers of KV written for the week stream (24 = real; default 1)")
    ap.add_argument("--full-hours", type=float, default=1.0, help="hours of a real 24-layer stream for page-in at real size (0: skip)")
    ap.add_argument("--checkpoints", default="1,24,168", help="hours stored at which latency is measured")
    ap.add_argument("--questions", type=int, default=10, help="questions per checkpoint and retriever")
    ap.add_argument("--hot-mib", type=int, default=256, help="hot-tier budget in MiB")
    ap.add_argument("--batch-windows", type=int, default=64, help="4-frame windows per ingest batch")
    ap.add_argument("--parts", default="week,full", help="what to run: 'week' (the week stream), 'full' (the real "
                    "24-layer page-in store), or both (default)")
    ap.add_argument("--reuse", action="store_true", help="with --path: measure the stores already there (from a "
                    "run with --keep) at their current length, without ingesting")
    ap.add_argument("--glibc-threshold", action="store_true", help="leave glibc's mmap threshold alone "
                    "(backend option malloc_mmap_threshold=None), to see the RSS growth it causes")
    ap.add_argument("--codec", default="none", help="kv_codec of the stores: a codec name (none, int8, int4, fp8) or "
                    'JSON such as \'{"name": "int4", "group_size": 32}\' (default none: bf16 as is)')
    ap.add_argument("--layout", default="0.5b", choices=sorted(LAYOUTS),
                    help="real KV layout of the model (0.5b: 24 layers x 2 heads x 64; 7b: 28 x 4 x 128)")
    ap.add_argument("--skip-raw", action="store_true", help="skip the raw read bandwidth measures (a 2 GiB file "
                    "and reads of the store's files)")
    ap.add_argument("--backend-options", default="{}", help="more options of the lancedb backend, as a JSON object "
                    "(e.g. '{\"cold_exact_rows\": null}': searches through the IVF_PQ index once it is built)")
    ap.add_argument("--path", default=None, help="store folder (default: a temporary folder, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the store")
    ap.add_argument("--json", default=None, help="also write every raw number here, with the blocks each question retrieved")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "disk-tier-results.md"),
                    help="markdown report (default docs/disk-tier-results.md; '-' for none)")
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"week", "full"}:
        ap.error(f"--parts takes 'week', 'full' or both, not {args.parts!r}")
    if args.reuse and not args.path:
        ap.error("--reuse needs --path (a folder a run with --keep left)")

    from mukv.blocks import KVLayout
    from mukv.plugins.retrievers.hierarchical import HierarchicalRetriever
    from mukv.plugins.retrievers.semi_hierarchical import SemiHierarchicalRetriever

    t_all = time.perf_counter()
    root = Path(args.path) if args.path else Path(tempfile.mkdtemp(prefix="mukv-week-"))
    root.mkdir(parents=True, exist_ok=True)
    weights = {"patch": 0.3, "frame": 0.3}
    retrievers = {"semi_hierarchical": SemiHierarchicalRetriever(2.0, 5, "segment", weights),
                  "hierarchical": HierarchicalRetriever(2.0, 5, "segment", weights)}
    from mukv.kvcodec import build_codec

    spec = json.loads(args.codec) if args.codec.strip().startswith("{") else args.codec
    opts = dict(hot_bytes=args.hot_mib << 20, commit_interval=2.0, codec=build_codec(spec))
    real = LAYOUTS[args.layout]
    if args.glibc_threshold:
        opts["malloc_mmap_threshold"] = None
    try:
        extra = json.loads(args.backend_options)
    except json.JSONDecodeError as exc:
        ap.error(f"--backend-options: not JSON ({exc})")
    if not isinstance(extra, dict):
        ap.error("--backend-options: expected a JSON object of the lancedb backend's options")
    opts.update(extra)
    print(f"store: {root}", flush=True)

    raw_bw = None if args.skip_raw else raw_read_bandwidth(root)
    if raw_bw is not None:
        print(f"raw sequential read bandwidth (fresh file, page cache dropped): {raw_bw / 1e9:.2f} GB/s", flush=True)

    layout = KVLayout(num_layers=args.layers, num_kv_heads=real["num_kv_heads"], head_dim=real["head_dim"],
                      dtype=torch.bfloat16, model_id=f"bench:{args.layers}x{real['num_kv_heads']}x{real['head_dim']}")
    week = None
    if "week" in parts:
        week = run_week(args, layout, root / "week", retrievers, opts)
    full = None
    if "full" in parts and args.full_hours > 0:
        full = run_full(args, root / "full", retrievers, opts)

    elapsed = time.perf_counter() - t_all
    report = render(args, layout, week, full, raw_bw, elapsed)
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps({"week": week, "full": full, "raw_read_Bps": raw_bw}, default=float))
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
        print(f"written to {args.out}")
    if not args.keep and not args.path:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def run_week(args, layout, week: Path, retrievers, opts) -> dict:
    """The week stream: ingest with hot-tier and memory samples every 2 h of video, latency at the checkpoints
    (``--reuse``: latency of the stored stream as it is, nothing ingested)."""
    from mukv.backends.disk import TieredBackend

    synth = Synth(layout)
    samples, results = [], {}
    if args.reuse:
        backend = TieredBackend(layout, str(week), "cpu", stream_id="week", read_only=True, **opts)
        h = backend.count("segment") * WINDOW / args.fps / 3600
        results[h] = checkpoint(backend, synth, retrievers, args.questions, h, week)
        mem = memory_parts(backend)
        backend.close()
        return {"samples": samples, "results": results, "frames": backend.count("segment") * WINDOW,
                "ingest_s": None, "groups": None, "memory": mem, "trimmed": None}
    total_windows = int(round(args.hours * 3600 * args.fps / WINDOW))
    checkpoints = sorted({float(h) for h in args.checkpoints.split(",") if float(h) <= args.hours + 1e-9})
    cp_windows = {h: int(round(h * 3600 * args.fps / WINDOW)) for h in checkpoints}
    backend = TieredBackend(layout, str(week), "cpu", stream_id="week", **opts)
    backend.set_state("session", {"model": layout.model_id, "model_id": layout.model_id,  # the stream contract
                                  "config": {"levels": [{"frames": 1}, {"frames": 1}, {"frames": WINDOW}]}})
    done, t_ingest = 0, 0.0
    sample_every = max(1, int(round(2 * 3600 * args.fps / WINDOW)))  # every 2 h of video
    marks = sorted(set(list(range(sample_every, total_windows, sample_every)) + list(cp_windows.values()) + [total_windows]))
    for target in marks:
        t0 = time.perf_counter()
        feed(backend, synth, done, target - done, args.batch_windows)
        t_ingest += time.perf_counter() - t0
        done = target
        hours = done * WINDOW / args.fps / 3600
        ts = backend.tier_stats()
        samples.append({"hours": hours, "hot_budget": ts["hot"]["budget_bytes"], "hot_reserved": ts["hot"]["reserved_bytes"],
                        "hot_used": ts["hot"]["used_bytes"], "rss": rss_bytes(), "ingest_s": t_ingest,
                        "memory": memory_parts(backend)})
        for h, w in cp_windows.items():
            if w == done:
                t0 = time.perf_counter()
                backend.flush()
                t_ingest += time.perf_counter() - t0
                results[h] = checkpoint(backend, synth, retrievers, args.questions, h, week)
        m = samples[-1]["memory"]
        print(f"  {hours:7.1f} h  hot {samples[-1]['hot_used'] / 2**20:7.1f}/{samples[-1]['hot_budget'] / 2**20:.0f} MiB"
              f"  rss {samples[-1]['rss'] / 2**20:7.1f} MiB (anon {m.get('RssAnon', 0) / 2**20:.0f}, glibc in use "
              f"{m.get('glibc_in_use', 0) / 2**20:.0f}, free kept {m.get('glibc_free_kept', 0) / 2**20:.0f}, lance caches "
              f"{m.get('lance_caches', 0) / 2**20:.0f})  ingest {t_ingest:6.1f} s", flush=True)
    backend.flush()
    groups = backend.tier_stats()["writer"]["groups"]
    mem = memory_parts(backend)
    trimmed = malloc_trim()
    backend.close()
    return {"samples": samples, "results": results, "frames": total_windows * WINDOW, "ingest_s": t_ingest,
            "groups": groups, "memory": mem, "trimmed": trimmed}


def checkpoint(backend, synth, retrievers, n_q: int, h: float, week: Path) -> dict:
    disk = du(week)
    res = measure(backend, synth, retrievers, n_q, int(h), week / "kv")
    out = {"disk_bytes": disk, "kv_bytes": du(week / "kv"), "index_bytes": du(week / "index"),
           "rows": sum(backend.count(lv) for lv in LEVELS), "retrievers": res,
           "indexed": bool(backend.table._has_vector_index)}
    print(f"[{h:g} h] rows={out['rows']:,} disk={disk / 1e9:.2f} GB "
          + " ".join(f"{n}: retrieve {r['retrieve_ms_median']:.1f} ms, page-in {r['pagein_ms_median']:.1f} ms"
                     for n, r in res.items()), flush=True)
    return out


def run_full(args, fpath: Path, retrievers, opts) -> dict:
    """The real 24-layer store: page-in at the real block sizes, and the raw read bandwidth of its own KV files."""
    from mukv.backends.disk import TieredBackend
    from mukv.blocks import KVLayout

    real = LAYOUTS[args.layout]
    flay = KVLayout(dtype=torch.bfloat16, model_id="bench:{num_layers}x{num_kv_heads}x{head_dim}".format(**real),
                    **real)
    fsynth = Synth(flay, seed=1)
    if args.reuse:
        fb = TieredBackend(flay, str(fpath), "cpu", stream_id="full", read_only=True, **opts)
        hours, t_full = fb.count("segment") * WINDOW / args.fps / 3600, None
    else:
        fb = TieredBackend(flay, str(fpath), "cpu", stream_id="full", **opts)
        fb.set_state("session", {"model": flay.model_id, "model_id": flay.model_id,  # the stream contract
                                 "config": {"levels": [{"frames": 1}, {"frames": 1}, {"frames": WINDOW}]}})
        fw = int(round(args.full_hours * 3600 * args.fps / WINDOW))
        t0 = time.perf_counter()
        seg = flay.num_layers * 2 * flay.num_kv_heads * LEVELS["segment"][1] * flay.head_dim
        feed(fb, fsynth, 0, fw, max(1, min(args.batch_windows // 8, Synth.POOL // (2 * seg))))
        fb.flush()
        hours, t_full = args.full_hours, time.perf_counter() - t0
    rng, raw = np.random.default_rng(7), []
    fres = measure(fb, fsynth, retrievers, args.questions, 99, fpath / "kv",
                   probe=None if args.skip_raw else lambda: raw.append(raw_read_pattern(fb, rng)))
    raw_pattern = statistics.median(raw) if raw else None
    full = {"hours": hours, "disk_bytes": du(fpath), "kv_bytes": du(fpath / "kv"), "index_bytes": du(fpath / "index"),
            "ingest_s": t_full, "frames": fb.count("segment") * WINDOW, "retrievers": fres,
            "read_threads": fb.options.read_threads, "raw_pattern": raw_pattern,
            "kv_bytes_decoded": sum(fb.count(lv) * LEVELS[lv][1] for lv in LEVELS) * flay.token_bytes()}
    fb.close()
    print(f"[full layout, {hours:g} h] disk={full['disk_bytes'] / 1e9:.2f} GB "
          + " ".join(f"{n}: page-in {r['pagein_ms_median']:.0f} ms for {r['disk_mb_per_question']:.0f} MB "
                     f"(read {r['read_gbps']:.2f} GB/s)" for n, r in fres.items()), flush=True)
    if args.skip_raw:
        return full
    # the same disk, the same files: plain sequential reads of this store's KV shards (after the questions, so
    # any host-side caching of what page-in read favours these numbers, not page-in's)
    kv = fpath / "kv" / "full" / "segment.zarr"
    full["raw_files_1"] = raw_read_files(kv, threads=1)
    full["raw_files_n"] = raw_read_files(kv, threads=fb.options.read_threads)
    print(f"raw read of the store's segment shards: {full['raw_files_1'] / 1e9:.2f} GB/s one file at a time, "
          f"{full['raw_files_n'] / 1e9:.2f} GB/s {fb.options.read_threads} at a time; of random question-sized "
          f"selections: {raw_pattern / 1e9:.2f} GB/s", flush=True)
    return full


CHANGES = """## Against the previous run (issue 4: page-in bandwidth, hierarchical latency, RSS)

The previous run of this benchmark (same machine, before the changes described below) measured, on the
real 24-layer store, page-in of 795 / 734 ms median per question (semi-hierarchical / hierarchical) at
0.20 / 0.18 GB/s; at 168 h, retrieval of 175.5 ms (semi-hierarchical) and 267.0 ms (hierarchical)
median; process RSS growing from 1.0 GB (1 h) to 2.0 GB (~110 h) and flat after; ingest 518 s. Its raw
figure (2.54 GB/s) was the fresh-file one of the table above. Figures depend on what else the two
shared cores and the host's disk do: two runs of this version an hour apart measured 168 h retrieval of
123 / 95 ms and 205 / 146 ms (semi-hierarchical / hierarchical), page-in of the real store 96 / 90 ms
and 101 / 92 ms. On the 168 h store with nothing else running, the hierarchical retriever's blocks for
10 questions were the same before and after the filter change, at 208 ms before and 87 ms after
(semi-hierarchical: 121 and 117 ms).
"""


DESIGN = """## Design choices these numbers support

- **Page-in reads the shards itself.** `load_kv` gets the final selection of one question per level; the
  blocks that are not hot are grouped by shard and a pool of reader threads (`read_threads`, 8) reads
  each shard through one file descriptor: its index (zarr v3 sharding: offsets of the uncompressed
  chunks, crc32c-checked), then every run of adjacent blocks in one `preadv` straight into the rows of
  the tensor `load_kv` returns (a reused pinned buffer on CUDA, then one upload), crc32 of each block
  as it lands (`preadv` and `zlib.crc32` release the GIL). The crc is compared with the one in the index
  row the search already returned, so page-in asks lancedb nothing. The hot tier copies each promoted
  block once. What zarr would do differently is only slower: a coroutine per run, a fresh array per
  run, then a gather and a scatter (the previous page-in). Arrays of another layout and `s3://` stores
  are still read through zarr.
- **Search over both tiers.** Hot blocks are searched by one matmul over the hot tier's vectors; blocks on
  disk through lancedb (an exact scan by default; with `cold_index` "auto", IVF_PQ once the table holds
  100k rows: cosine, sqrt(n) partitions, 8-dim sub-vectors, nprobes 32, refine x4), restricted by a filter of validated stream id,
  level and `block_id < committed`; the union is re-scored exactly (float64) and merged, so the same
  question gets the same blocks before and after a reopen. The alternative, every vector in an in-RAM flat
  index, is faster per search (a 1.59M x 128 float32 matmul is ~0.8 GB and tens of ms on 2 cores) but its
  RAM grows with the stream (0.8 GB per week of 0.5B vectors, 2.7x that with metadata), which issue 4
  rules out.
- **Memory stays flat.** The hot tier is one arena of its budget. The rest of RSS is in the memory table
  (glibc's heap in use includes the hot tier's 422 MiB and the benchmark's 96 MiB pool of synthetic KV).
  An earlier run's RSS grew from 1.0 to 2.0 GB over ~110 h. glibc's statistics say what that is: with
  glibc's own threshold (`--glibc-threshold --parts week --hours 48 --checkpoints 48 --questions 3 --out -`)
  RSS grew 1.17 -> 1.60 GB from 2 to 48 h, of which heap in use +0.05 GB (lance's caches, bounded by
  `lance_cache_bytes`, 256 + 64 MiB) and free but kept heap +0.34 GB. glibc raises its mmap threshold by
  itself after the first big free; from then on the MiB-sized KV batches and shards that ingest
  allocates and the offload writer frees come from its heap arenas and stay there, free but resident.
  The backend now fixes the threshold at `malloc_mmap_threshold` (4 MiB; `mallopt`, process-wide; `None`
  leaves glibc alone), so those go back to the system when freed (`--parts week --hours 24 --checkpoints
  24 --questions 2 --out -`: 1.18 GB RSS at 24 h, 1.38 GB with `--glibc-threshold`, ingest 41 s and
  40 s). What still grows (to ~0.3 GB free but kept, flat from ~120 h) is smaller allocations freed in
  the arenas of lance's threads; `malloc_trim(0)` at the end gave back about a third of it.
- **Strictly hierarchical retrieval** searches the segment level once, then reads only the frame and patch
  rows inside the chosen segments' frame ranges and ranks them exactly. The filter says
  `frame_start >= a AND frame_start <= b AND frame_end <= b` per range (the middle term is implied, as a
  block never ends before it starts), so lance finds the rows through its `frame_start` BTREE and checks
  `frame_end` on those alone; `block_id < committed` is applied to the rows read, not in lance's filter,
  where it made lance intersect with every row of the level. Its cost is the segment search plus a few
  hundred rows, whatever the stream's length.
- **KV layout.** One zarr array per stream and level, `[N, Y, 2, H, K, D]`, chunks of ~256 KiB (a segment
  block of the real model is one chunk; patch blocks share chunks), shards of ~16 MiB: a week of the real
  model is ~45k files instead of 1.6M. A commit that ends inside a shard rewrites that shard on the next
  commit (zarr writes whole shards, atomically via temp file + rename), so the offload writer groups
  2 s of blocks per commit; smaller shards cut this write amplification, larger ones the file count.
- **Crash safety.** KV first, then its index rows (one lancedb commit), then the stream's state file
  (counts + cursors, temp file + rename). A block is stored once the state counts it; on reopening for
  writing, rows and KV beyond the counts and temp files are removed (the kill -9 test checks this 30 times).
  Every row carries the crc32 of its block's bytes, checked at page-in.
"""


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def render(args, layout, week, full, raw_bw, elapsed) -> str:
    cmd = "python benchmarks/scale_week.py" + "".join(
        f" {a}" for a in sys.argv[1:]) if sys.argv[0].endswith("scale_week.py") else "python benchmarks/scale_week.py"
    real = LAYOUTS[args.layout]
    token_real = real["num_layers"] * 2 * real["num_kv_heads"] * real["head_dim"] * 2
    scale = real["num_layers"] / layout.num_layers
    L = []
    L.append("# Disk tier at week scale\n")
    L.append(f"Command: `{cmd}`  ")
    L.append(f"KV codec: `{args.codec}`; KV layout: {args.layout} ({real['num_layers']} layers x "
             f"{real['num_kv_heads']} KV heads x head dim {real['head_dim']}, bf16).  ")
    L.append(f"Machine: {os.cpu_count()} CPU cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
             f"no GPU (hot tier in RAM); torch {torch.__version__}. Total run {elapsed / 60:.1f} min.\n")
    L.append("## What was simulated, and how it is scaled down\n")
    if week:
        frames_week = week["frames"]
        L.append(f"- {frames_week * 1.0 / args.fps / 3600:g} h of video at {args.fps:g} fps = {frames_week:,} frames; MuKV "
                 f"blocks of the LLaVA-OneVision-{args.layout.upper()} shape per 4-frame window: 16 patch blocks (K=4), 4 frame blocks "
                 "(K=19), 1 segment block (K=627); every block's metadata and vector is stored "
                 f"({sum(LEVELS[lv][0] for lv in LEVELS) * frames_week // WINDOW:,} index rows, as at full scale).")
        L.append(f"- **KV is scaled down**: the week stream writes KV of {layout.num_layers} of the model's 24 layers "
                 f"(every other dimension real, bf16), i.e. 1/{scale:g} of the real bytes, because the real week "
                 f"({token_real * 196 * frames_week / 1e12:.2f} TB) does not fit this disk. KV bytes below are "
                 f"also shown x{scale:g} (exact: KV scales linearly in layers).")
    if full:
        L.append(f"- **Page-in at the real size** is measured on a second store with the real {real['num_layers']}-layer "
                 f"layout, {full['hours']:g} h of video ({full['frames']:,} frames, {full['kv_bytes'] / 1e9:.2f} GB of KV "
                 f"files; {full.get('kv_bytes_decoded', full['kv_bytes']) / 1e9:.2f} GB of KV decoded).")
    L.append("- Synthetic KV bytes and clustered synthetic vectors (no model runs); questions are query vectors "
             f"near the topic of a random stored moment; {args.questions} questions per point, MuKV's top-k "
             "20/32/12 with 2x over-retrieval. Before every question the KV files are dropped from the page cache "
             "(`posix_fadvise(DONTNEED)`), so page-in reads the disk.")
    L.append(f"- Hot tier: {args.hot_mib} MiB budget, eviction `lru_segment`, offload commit interval 2 s.\n")
    samples = week["samples"] if week else []
    if samples:
        L.append("## Hot tier and memory over stream time (must stay flat)\n")
        L.append("| stream hours | hot budget MiB | hot reserved MiB (arena + bookkeeping) | hot held MiB | process RSS MiB "
                 "| anonymous MiB | glibc heap in use MiB | glibc free, kept MiB | lance caches MiB | ingest s |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        step = max(1, len(samples) // 14)
        for s in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
            m = s.get("memory", {})
            L.append(f"| {s['hours']:.0f} | {s['hot_budget'] / 2**20:.0f} | {s['hot_reserved'] / 2**20:.1f} | "
                     f"{s['hot_used'] / 2**20:.1f} | {s['rss'] / 2**20:.0f} | {_mib(m.get('RssAnon'))} | "
                     f"{_mib(m.get('glibc_in_use'))} | {_mib(m.get('glibc_free_kept'))} | {_mib(m.get('lance_caches'))} | "
                     f"{s['ingest_s']:.0f} |")
        L.append("")
        fw = week["frames"]
        L.append(f"Ingest: {fw:,} frames in {week['ingest_s']:.0f} s = {fw / max(week['ingest_s'], 1e-9):,.0f} frames/s "
                 f"({fw / max(week['ingest_s'], 1e-9) / args.fps:,.0f}x real time), {week['groups']} offload commits.")
        if week.get("trimmed") is not None:
            L.append(f"At the end, `malloc_trim(0)` gave {week['trimmed'] / 2**20:.0f} MiB of glibc's free heap back "
                     "to the system.")
        L.append("")
    results = week["results"] if week else {}
    if results or full:
        L.append("## Disk bytes per hour of video\n")
        L.append("| stored | index rows | KV on disk GB (measured) | index GB | KV GB at 24 layers | per hour of video, real layout |")
        L.append("|---:|---:|---:|---:|---:|---:|")
        for h, r in results.items():
            real_kv = r["kv_bytes"] * scale
            L.append(f"| {h:g} h | {r['rows']:,} | {r['kv_bytes'] / 1e9:.2f} | {r['index_bytes'] / 1e9:.2f} | "
                     f"{real_kv / 1e9:.1f} | {(real_kv + r['index_bytes']) / h / 1e9:.2f} GB/h |")
        if full:
            L.append(f"| {full['hours']:g} h (real {real['num_layers']} layers) | - | {full['kv_bytes'] / 1e9:.2f} | "
                     f"{full['index_bytes'] / 1e9:.3f} | {full['kv_bytes'] / 1e9:.2f} | "
                     f"{full['disk_bytes'] / full['hours'] / 1e9:.2f} GB/h (measured) |")
        L.append("")
        L.append("## Retrieval and page-in per question\n")
        L.append("| stored | retriever | cold index | retrieve ms (median / p90) | page-in ms (median / p90) | KV per question MB "
                 "| read from disk MB | read GB/s (preadv + crc32) | page-in GB/s (stored) | page-in GB/s (decoded) "
                 "| decode ms |")
        L.append("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        rows = [(f"{h:g} h ({layout.num_layers} layer KV)", "IVF_PQ" if r["indexed"] else "exact", r["retrievers"])
                for h, r in results.items()]
        if full:
            rows.append((f"{full['hours']:g} h (real {real['num_layers']} layers)", "exact", full["retrievers"]))
        for where, index, rs in rows:
            for name, x in rs.items():
                L.append(f"| {where} | {name} | {index} | {x['retrieve_ms_median']:.1f} / {x['retrieve_ms_p90']:.1f} | "
                         f"{x['pagein_ms_median']:.1f} / {x['pagein_ms_p90']:.1f} | {x['kv_mb_per_question']:.1f} | "
                         f"{x['disk_mb_per_question']:.1f} | {x.get('read_gbps', 0.0):.2f} | {x['pagein_gbps']:.2f} | "
                         f"{x.get('pagein_gbps_decoded', x['pagein_gbps']):.2f} | {x.get('decode_ms_median', 0.0):.1f} |")
        L.append("")
    L.append("Read GB/s = bytes paged in from disk / time of the reader threads (grouping by shard, shard indexes, "
             "`preadv` into the output, crc32); page-in GB/s = the same bytes / the disk part of `load_kv` (also the "
             "crc comparison and the copies of repeated ids; the promotion into the hot tier is in page-in ms only). "
             "At 1 h the whole week stream still fits the hot tier, so nothing is read from disk there.\n")
    if raw_bw is None:
        L.append("(Raw read bandwidth not measured: `--skip-raw`.)\n")
        L.append("Raw numbers (JSON; the blocks each question retrieved are left out):\n")
        L.append("```json")
        L.append(json.dumps(_strip({"week": week, "full": full, "raw_read_Bps": raw_bw}), default=float))
        L.append("```")
        return "\n".join(L) + "\n"
    L.append("## Page-in against this disk's raw bandwidth\n")
    L.append("Raw reads in the same run, page cache dropped before each:\n")
    L.append("| what is read | how | GB/s |")
    L.append("|---|---|---:|")
    L.append(f"| a fresh 2 GiB file (just written and fsynced) | sequential, 8 MiB reads | {raw_bw / 1e9:.2f} |")
    if full and "raw_files_1" in full:
        n = full["read_threads"]
        L.append(f"| the real store's segment shards (16 MiB files), after the questions | whole files one after another, "
                 f"8 MiB reads | {full['raw_files_1'] / 1e9:.2f} |")
        L.append(f"| the same | {n} files at a time | {full['raw_files_n'] / 1e9:.2f} |")
        L.append(f"| what a question pages in: a random selection of 12 segment, 32 frame and 20 patch blocks of the "
                 f"real store, right before each question's page-in | one `pread` per run of adjacent blocks, {n} "
                 f"at a time, no index, no crc (median of {2 * args.questions}) | {full['raw_pattern'] / 1e9:.2f} |")
        best = max(x["read_gbps"] for x in full["retrievers"].values())
        L.append(f"| page-in of the questions' selections | `load_kv`'s reader threads (read GB/s above) | {best:.2f} |")
        L.append("")
        L.append(f"Page-in reads at {best / (full['raw_pattern'] / 1e9):.0%} of plain reads of the same access pattern, "
                 f"{best / (full['raw_files_n'] / 1e9):.0%} of reading whole shards {n} at a time and "
                 f"{best / (raw_bw / 1e9):.0%} of the fresh-file figure. The fresh-file figure is not a ceiling for "
                 "page-in: the store's own shards, read the same way, come at a fraction of it (a file just written "
                 "is likely still cached below this virtual machine). Page-in is bounded by the access pattern "
                 "(64 blocks of 49 KiB to 7.7 MiB in ~45 files); what is left between it and plain reads is each "
                 "shard's index read before its blocks, the crc32 of 100 MB on 2 cores, and the first touch of a fresh "
                 "100 MB output tensor.\n")
    L.append(CHANGES)
    L.append(DESIGN)
    L.append("Raw numbers (JSON; the blocks each question retrieved are left out):\n")
    L.append("```json")
    L.append(json.dumps(_strip({"week": week, "full": full, "raw_read_Bps": raw_bw}), default=float))
    L.append("```")
    return "\n".join(L) + "\n"


def _strip(x):
    """The raw numbers without the retrieved blocks, floats to 4 significant digits."""
    if isinstance(x, dict):
        return {str(k): _strip(v) for k, v in x.items() if k != "blocks"}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    if isinstance(x, float):
        return float(f"{x:.4g}")
    return x


if __name__ == "__main__":
    sys.exit(main())
