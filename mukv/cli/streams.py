"""`mukv streams list|delete|export|import` and `mukv repair`: the streams of a store as units."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import InputError
from .common import OneLineParser, _parse_config, _table


def _storage(raw: str | None, flag: str = "--backend-options") -> dict[str, Any] | None:
    opts = _parse_config(raw, flag) or {}
    unknown = sorted(set(opts) - {"storage_options"})
    if unknown:
        raise InputError(f"{flag}: only storage_options matter here; got {unknown}")
    return opts.get("storage_options")


def _span(s: dict[str, Any]) -> str:
    from ..plots import format_time

    if s.get("wall_start"):
        return f"{s['wall_start']} .. {s['wall_end']}"
    if s.get("t_end") is None:
        return "-"
    return f"{format_time(s.get('t_start') or 0.0)} .. {format_time(s['t_end'])}"


def _cmd_streams(args: argparse.Namespace) -> int:
    from .. import streams
    from ..plots import format_bytes

    opts = {"storage_options": _storage(args.backend_options)} if args.backend_options else None
    if args.action == "list":
        rows = streams.list_streams(args.store, opts)
        if args.json:
            print(json.dumps(rows, indent=1, default=str))
            return 0
        if not rows:
            print(f"{args.store}: no streams")
            return 0
        table = []
        for s in rows:
            if "error" in s:
                table.append((s["id"], "-", "-", "-", "-", "-", f"UNREADABLE: {s['error'][:80]}"))
                continue
            srcs = ", ".join(sorted({x["location"].rsplit("/", 1)[-1] for x in s["sources"] if x["kind"] != "feed"}))
            gaps = sum(g["frames"] for g in s["gaps"])
            note = (f"written by pid {s['writer']}" if s.get("writer") else "") + (f"; {gaps} frames dropped" if gaps else "")
            table.append((s["id"], f"{s['frames']:,}", _span(s), format_bytes(s["bytes"]), s["model"] or "-",
                          srcs[:60] or "-", note.strip("; ") or ""))
        print(_table(table, ("stream", "frames", "time span", "KV", "model", "sources", "")))
        return 0
    if args.action == "delete":
        out = streams.delete_stream(args.store, args.stream, opts)
        print(f"deleted stream {out['id']!r}: " + (", ".join(f"{n:,} {lv}" for lv, n in out["blocks"].items()) or "no")
              + f" blocks, {out['index_rows']:,} index rows, {format_bytes(out['kv_bytes'])} of KV reclaimed")
        return 0
    if args.action == "export":
        dest_opts = {"storage_options": _storage(args.dest_options, "--dest-options")} if args.dest_options else None
        out = streams.export_stream(args.store, args.stream, args.dest, opts, dest_opts)
        print(f"exported stream {out['id']!r} to {out['dest']}: {out['frames']:,} frames, "
              + ", ".join(f"{n:,} {lv}" for lv, n in out["blocks"].items()) + " blocks; verified")
        return 0
    src_opts = {"storage_options": _storage(args.src_options, "--src-options")} if args.src_options else None
    out = streams.import_stream(args.store, args.src, stream_id=args.as_id, from_stream=args.from_stream,
                                backend_options=opts, src_options=src_opts)
    print(f"imported stream {out['id']!r} from {out['source']}: {out['frames']:,} frames, "
          + ", ".join(f"{n:,} {lv}" for lv, n in out["blocks"].items()) + " blocks; verified")
    return 0


def run_repair(store: str, stream_id: str | None, yes: bool, as_json: bool,
               storage_options: dict[str, Any] | None) -> int:
    """Print what a repair would do (and do it with ``yes``). Exit 0 when the store needs nothing or was
    repaired, 1 when a repair is needed but was not asked for, or a stream cannot be repaired."""
    from .. import streams

    opts = {"storage_options": storage_options} if storage_options else None
    plan = streams.repair(store, stream_id, apply=yes, backend_options=opts)
    print(json.dumps(plan.to_dict(), indent=1) if as_json else plan.summary())
    refused = any(s.refused for s in plan.streams)
    return 1 if refused or (plan.needed and not plan.applied) else 0


def _cmd_repair(args: argparse.Namespace) -> int:
    return run_repair(args.store, args.stream_id, args.yes, args.json, _storage(args.backend_options))


def add_parsers(sub: Any, formatter: Any, parser_class: Any = OneLineParser) -> None:
    """The ``streams`` and ``repair`` commands (``parser_class``: the command line's parser class)."""
    p = sub.add_parser("streams", formatter_class=formatter, help="list, delete, export or import a store's streams",
                       description="The streams of a store as units. `list` shows each stream's frames, time span "
                                   "(wall-clock when known), KV bytes, model, sources and dropped frames; `delete` "
                                   "removes a stream and reclaims its disk; `export` copies one into a new "
                                   "self-contained store (local or s3://), verified; `import` takes such a copy "
                                   "into a store, verified first and after.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=parser_class)
    a = actions.add_parser("list", formatter_class=formatter, help="every stream of a store")
    a.add_argument("store", help="the store (a folder or s3:// URI)")
    a.add_argument("--json", action="store_true", help="print as JSON")
    a = actions.add_parser("delete", formatter_class=formatter, help="delete a stream, reclaiming its disk")
    a.add_argument("store", help="the store")
    a.add_argument("stream", help="the stream id")
    a = actions.add_parser("export", formatter_class=formatter, help="copy a stream into a new store")
    a.add_argument("store", help="the store")
    a.add_argument("stream", help="the stream id")
    a.add_argument("dest", help="a new (or empty) folder, or an s3:// URI")
    a.add_argument("--dest-options", metavar="JSON", help='{"storage_options": {...}} of the destination')
    a = actions.add_parser("import", formatter_class=formatter, help="take an exported stream into a store")
    a.add_argument("store", help="the store (created if missing)")
    a.add_argument("src", help="the export (a store holding the stream)")
    a.add_argument("--as", dest="as_id", metavar="ID", help="the stream's id in the store (default: its own)")
    a.add_argument("--from-stream", metavar="ID", help="which stream of SRC, if it holds several")
    a.add_argument("--src-options", metavar="JSON", help='{"storage_options": {...}} of the source')
    for name, q in actions.choices.items():
        q.add_argument("--backend-options", metavar="JSON", help='{"storage_options": {...}} of the store')
    p.set_defaults(func=_cmd_streams)

    p = sub.add_parser("repair", formatter_class=formatter, help="make streams' states agree with their data",
                       description="Show what a repair would do to a store's streams whose state disagrees with "
                                   "their data (blocks the state lost count of, frames stored twice, times going "
                                   "back, a garbled state), and do it with --yes. Nothing changes without --yes.")
    p.add_argument("store", help="the store")
    p.add_argument("--stream-id", help="only this stream (default: every stream)")
    p.add_argument("--yes", action="store_true", help="do the repair")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--backend-options", metavar="JSON", help='{"storage_options": {...}} of the store')
    p.set_defaults(func=_cmd_repair)
