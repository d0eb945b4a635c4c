"""`mukv logs`: the question log of a store (as `llm logs` reads its database)."""

from __future__ import annotations

import argparse
import json

from ..errors import InputError
from .common import _parse_config

LOGS_DESCRIPTION = (
    "Print the question log of a store's stream: each question asked with --log-questions (or "
    "log_questions=True / question_log = true), its answer, the blocks retrieved per level, timings, the "
    "model and the configuration's hash. Newest last; -n picks how many. Works on local and s3:// stores "
    "and never takes the stream's writer lock.")


def _cmd_logs(args: argparse.Namespace) -> int:
    from ..logs import QuestionLog, format_record, parse_time

    if args.count < 0:
        raise InputError(f"-n/--count must be 0 (all) or more; got {args.count}")
    options = _parse_config(args.backend_options, "--backend-options") or {}
    qlog = QuestionLog(str(args.store), args.stream_id, storage_options=options.get("storage_options"))
    if not qlog.files.remote:
        from pathlib import Path

        if not Path(args.store).exists():
            raise InputError(f"{args.store}: no such store")
    records = qlog.records(count=args.count or None, query=args.query, model=args.model,
                           config_hash=args.config_hash,
                           since=parse_time(args.since, "--since") if args.since else None,
                           until=parse_time(args.until, "--until") if args.until else None)
    if args.show_config:
        for rec in records:
            rec["config"] = qlog.config(str(rec.get("config_hash", "")))
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    if not records:
        total = len(qlog.ids())
        print(f"no records{' match' if total else ''} in the question log of {args.store} "
              f"(stream {args.stream_id!r}){f'; it holds {total}' if total else ''}"
              + ("" if total else "; ask with --log-questions to keep one"))
        return 0
    for i, rec in enumerate(records):
        if i:
            print()
        print(format_record(rec))
        if args.show_config:
            print("config: " + json.dumps(rec.get("config")))
    return 0
