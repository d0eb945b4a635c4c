"""The disk tier's vector index as its table grows: recall against exact search, and training time.

    python benchmarks/index_upkeep.py                      # about 4 minutes on 2 cores
    python benchmarks/index_upkeep.py --rows 10000 20000 45000 90000 150000 --out -

Feeds one synthetic stream of clustered block vectors (scenes of 90 blocks around 400 recurring
centres, the shape of a camera that returns to the same views) into the disk tier's lancedb
table in commits of 300 rows, through :class:`~mukv.backends.disk.lance_index.BlockTable`'s own
upkeep with the IVF_PQ index on (``cold_index: "auto"``): the index is built once the table holds
``--rows[0]`` rows, and lance's ``optimize()`` compacts the table and updates the index every 32
commits (``--optimize-every``).

At each checkpoint it asks 100 queries (a stored vector plus noise) and reports, for the search
through the index and for the exact scan (the default, ``cold_index: "exact"``), recall@20 against
exact cosine ranking, the mean cosine of what it returned over the exact top 20's, and the median
milliseconds per search; after the last checkpoint the index is trained afresh on the same rows and
measured again, to separate what the upkeep loses from what the index loses at that size. CPU only,
no model; prints the lancedb version.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mukv.backends.disk.files import Files  # noqa: E402
from mukv.backends.disk.lance_index import BlockTable, schema  # noqa: E402


def batch(rng: np.random.Generator, centres: np.ndarray, start: int, n: int, noise: float):
    v = centres[(np.arange(start, start + n) // 90) % len(centres)]
    v = v + noise * rng.standard_normal(v.shape).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = np.arange(start, start + n)
    zeros = np.zeros(n, np.int64)
    table = pa.table({
        "stream_id": ["s"] * n, "level": ["patch"] * n, "block_id": ids, "segment_id": ids // 4,
        "frame_start": ids, "frame_end": ids + 1, "t_start": ids * 2.0, "t_end": ids * 2.0 + 2,
        "tokens": np.full(n, 2, np.int32), "kept": [[0]] * n, "token_index": [[0]] * n, "positions": [[0]] * n,
        "kv_path": ["x"] * n, "kv_row": ids, "crc32": zeros,
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1]), "txn": zeros,
    }, schema=schema(v.shape[1]))
    return v, table


def quality(table: BlockTable, vectors: np.ndarray, queries: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    n = len(vectors)
    recall, ratio, ms = [], [], []
    for i in rng.choice(n, queries, replace=False):
        q = vectors[i] + 0.3 * rng.standard_normal(vectors.shape[1]).astype(np.float32)
        q /= np.linalg.norm(q)
        sims = vectors @ q
        exact = np.argsort(-sims)[:20]
        t = time.perf_counter()
        got = np.asarray(table.search("s", "patch", n, q, 20).column("block_id").to_pylist())
        ms.append((time.perf_counter() - t) * 1e3)
        recall.append(len(set(got.tolist()) & set(exact.tolist())) / 20)
        ratio.append(float(sims[got].mean() / sims[exact].mean()))
    return {"rows": n, "recall_at_20": float(np.mean(recall)), "cosine_ratio": float(np.mean(ratio)),
            "ms_per_search": float(np.median(ms))}


def run(args) -> dict:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((400, args.dim)).astype(np.float32)
    table = BlockTable(Files(tempfile.mkdtemp(prefix="mukv-upkeep-")), args.dim, vector_index_rows=args.rows[0],
                       scalar_index_rows=min(20_000, args.rows[0]), optimize_every=args.optimize_every,
                       exact_rows=None)
    vectors, out, start = [], [], 0
    for target in args.rows[1:]:
        while start < target:
            v, rows = batch(rng, centres, start, 300, args.noise)
            vectors.append(v)
            table.add(rows)
            table.maintain()
            start += 300
        allv = np.concatenate(vectors)
        row = {"index": quality(table, allv, args.queries, seed=len(out) + 1)}
        table.exact_rows = 1 << 62
        row["exact"] = quality(table, allv, args.queries, seed=len(out) + 1)
        table.exact_rows = None
        out.append(row)
        print(json.dumps(row), flush=True)
    table.build_vector_index()
    fresh = quality(table, np.concatenate(vectors), args.queries, seed=len(out))
    print("trained afresh:", json.dumps(fresh), flush=True)
    return {"checkpoints": out, "fresh_at_last": fresh}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 20_000, 45_000, 90_000, 150_000],
                   help="rows at which the index is first built, then the checkpoints")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--noise", type=float, default=0.35, help="spread of a scene's vectors around its centre")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--optimize-every", type=int, default=32, help="commits between upkeep turns (the disk tier's)")
    p.add_argument("--out", default="-", help="JSON file of the results ('-': print only)")
    args = p.parse_args(argv)
    import lancedb

    res = {"args": vars(args), "lancedb": lancedb.__version__, **run(args)}
    print(f"lancedb {res['lancedb']}")
    print("| rows | through the index: recall@20, returned/exact cosine, ms | exact scan: ms |")
    print("|---:|---|---:|")
    for c in res["checkpoints"]:
        i, e = c["index"], c["exact"]
        print(f"| {i['rows']:,} | {i['recall_at_20']:.2f}, {i['cosine_ratio']:.3f}, {i['ms_per_search']:.0f} "
              f"| {e['ms_per_search']:.0f} |")
    f = res["fresh_at_last"]
    print(f"index trained afresh at {f['rows']:,} rows: recall@20 {f['recall_at_20']:.2f}, cosine "
          f"{f['cosine_ratio']:.3f}, {f['ms_per_search']:.0f} ms")
    if args.out != "-":
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
