"""`mukv inspect`: what a store holds, per level and tier."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING



if TYPE_CHECKING:  # pragma: no cover
    from ..session import Session
from ..errors import InputError
from .common import _levels_line, _open_store, _table


def _inspect_rows(session: "Session") -> list[tuple]:
    """Rows (level, tier, blocks, tokens, bytes) of the store, levels in configuration order."""
    from ..plots import format_bytes, level_tiers

    per_level = level_tiers(session.backend)
    rows = []
    for lp in session.levels:
        tiers = per_level.get(lp.level.name) or {"-": {"blocks": 0, "tokens": 0, "bytes": 0}}
        for tier, v in tiers.items():
            rows.append((lp.level.name, tier, f"{v['blocks']:,}", f"{v['tokens']:,}", format_bytes(v["bytes"])))
    return rows


def _codecs_line(session: "Session") -> str:
    """The KV codec new blocks are written with, and the codecs of each level's arrays where they differ."""
    line = f"{json.dumps(session.config.kv_codec)} for new blocks"
    archive = getattr(session.backend, "archive", None)
    if archive is None:
        return line
    arrays = []
    for lp in session.levels:
        parts = archive.parts(lp.level.name)
        if len({p.codec.name for p in parts}) > 1 or any(p.codec.name != session.codec.name for p in parts):
            arrays.append(f"{lp.level.name}: " + ", ".join(f"{p.codec.name} from block {p.first}" for p in parts))
    return line + ("; arrays " + "; ".join(arrays) if arrays else "")


def _print_inspect(session: "Session", args: argparse.Namespace) -> None:
    from ..plots import format_bytes, format_time, memory_history, tier_bytes

    st = session.stats()
    stored = session.backend.get_state("session", {}) or {}
    print(f"store    {args.store}  (stream {args.stream_id!r}, backend {args.backend})")
    print(f"model    {stored.get('model', session.model.name)}  [{session.model.layout.model_id}]")
    print(f"stream   {st['frames']:,} frames, {format_time(st['last_time'] or 0)} of stream time"
          + (f", frames of {st['frame_size'][0]}x{st['frame_size'][1]}" if st.get("frame_size") else ""))
    if st.get("wall_origin") is not None:
        from ..clock import iso

        first = session._stream.first_time
        print(f"clock    {iso(first or 0.0, st['wall_origin'])} .. {iso(st['last_time'] or 0.0, st['wall_origin'])} "
              "(wall-clock, UTC)")
    for src in st.get("sources", [])[-5:]:
        a, b = src["frames"]
        print(f"source   {src['kind']} {src['location']}: frames {a:,}..{b - 1:,}"
              + ("" if src.get("complete") or src["kind"] == "feed" else " (incomplete: `mukv ingest` resumes it)"))
    if st.get("gaps"):
        dropped = sum(g["frames"] for g in st["gaps"])
        print(f"gaps     {len(st['gaps'])} gap(s), {dropped:,} frames dropped")
    print(f"levels   {_levels_line(session.config)}")
    print(f"kv       {st['kv_bytes_per_token']:,} bytes per token (all layers, keys and values); "
          f"{format_bytes(st['bytes'])} stored in all")
    print(f"codec    {_codecs_line(session)}")
    print()
    print(_table(_inspect_rows(session), ("level", "tier", "blocks", "tokens", "bytes"), right=(2, 3, 4)))
    print()
    print("tiers    " + ", ".join(f"{t} {format_bytes(b)}" for t, b in tier_bytes(session.backend).items()))
    tier_fn = getattr(session.backend, "tier_stats", None)
    if callable(tier_fn):
        ts = tier_fn()
        hot, disk = ts.get("hot") or {}, ts.get("disk") or {}
        if "budget_bytes" in hot:
            print(f"hot      {format_bytes(hot.get('used_bytes', 0))} used of a {format_bytes(hot['budget_bytes'])} "
                  f"budget, {hot.get('evicted', 0):,} blocks evicted so far")
        if "kv_bytes" in disk:
            print(f"disk     {format_bytes(disk['kv_bytes'])} of KV files")
        for key, value in ts.items():
            if key not in ("hot", "disk"):
                print(f"{key:<8} {json.dumps(value, default=str)}")
    n = len(memory_history(session))
    if n:
        print(f"history  {n} memory records over stream time (draw them: mukv inspect {args.store} --plot memory.png)")


def _storage(args: argparse.Namespace):
    from .common import _parse_config

    opts = _parse_config(getattr(args, "backend_options", None), "--backend-options") or {}
    return opts.get("storage_options")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .. import plots

    if args.repair and not args.verify:
        raise InputError("--repair goes with --verify (or use `mukv repair STORE`)")
    if args.yes and not args.repair:
        raise InputError("--yes goes with --verify --repair")
    if args.verify:  # end-to-end check of the store's files; needs no model
        from ..backends.disk import verify_store

        report = verify_store(str(args.store), stream_id=args.stream_id)
        print(json.dumps(report.to_dict(), indent=1, default=str) if args.json else report.summary())
        if args.repair:
            from .streams import run_repair

            return run_repair(str(args.store), args.stream_id, args.yes, args.json, _storage(args))
        return 0 if report.ok else 1
    if args.stream_id is None:
        args.stream_id = "default"
    session = _open_store(args, read_only=True)
    try:
        if args.json:
            st = session.stats()
            print(json.dumps({"store": str(args.store), "stream_id": args.stream_id, "backend": args.backend,
                              "frames": st["frames"], "last_time": st["last_time"],
                              "kv_bytes_per_token": st["kv_bytes_per_token"], "kv_codec": session.config.kv_codec,
                              "stats": session.backend.stats(), "tiers": plots.level_tiers(session.backend),
                              "config": session.config.model_dump(mode="json")}, indent=1, default=str))
        else:
            _print_inspect(session, args)
        if args.plot:
            history = plots.memory_history(session) or [plots.memory_snapshot(session)]
            out = plots.plot_memory(history, args.plot)
            print(f"wrote {out}", file=sys.stderr if args.json else sys.stdout)
    finally:
        session.close()
    return 0

