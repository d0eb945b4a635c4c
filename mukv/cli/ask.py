"""`mukv ask` and `mukv chat`: questions over a stored stream."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..errors import InputError, MukvError

from .common import _open_store, _parse_top_k, _print_answer
from .inspect import _print_inspect


def _answer_json(answer) -> str:
    return json.dumps(dataclasses.asdict(answer), indent=1)


def _cmd_ask(args: argparse.Namespace) -> int:
    from .. import plots

    session = _open_store(args, read_only=True)
    try:
        answer = session.ask(args.question, top_k=_parse_top_k(args.top_k), max_new_tokens=args.max_new_tokens,
                             since=args.since, until=args.until)
        if args.json:
            print(_answer_json(answer))
        else:
            print(f"Q: {answer.question}")
            _print_answer(answer)
        if args.plot:
            out = plots.plot_retrieval_timeline(answer, args.plot, duration=session.stats()["last_time"])
            print(f"wrote {out}", file=sys.stderr if args.json else sys.stdout)
    finally:
        session.close()
    return 0


CHAT_HELP = """type a question and press Enter. Commands:
  /stats        what the store holds
  /plot PATH    write the retrieval timeline of the last answer as PNG
  /help         this text
  /quit         leave (or Ctrl-D)"""


def _cmd_chat(args: argparse.Namespace) -> int:
    from .. import plots

    session = _open_store(args, read_only=True)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # pragma: no cover - not on every platform
            pass
    last = None
    try:
        st = session.stats()
        print(f"{args.store}: {st['frames']:,} frames, {plots.format_time(st['last_time'] or 0)} of stream. "
              "Ask a question (/help for commands, /quit to leave).")
        while True:
            try:
                line = input("? " if interactive else "")
            except EOFError:
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit", "/q"):
                break
            try:
                if line == "/help":
                    print(CHAT_HELP)
                elif line == "/stats":
                    _print_inspect(session, args)
                elif line.startswith("/plot"):
                    target = line[len("/plot"):].strip()
                    if not target:
                        raise InputError("/plot needs a file name, e.g. /plot timeline.png")
                    if last is None:
                        raise InputError("no answer to plot yet: ask a question first")
                    print(f"wrote {plots.plot_retrieval_timeline(last, target, duration=session.stats()['last_time'])}")
                elif line.startswith("/"):
                    raise InputError(f"unknown command {line.split()[0]!r}; /help lists them")
                else:
                    if not interactive:
                        print(f"Q: {line}")
                    last = session.ask(line, max_new_tokens=args.max_new_tokens)
                    _print_answer(last)
            except (MukvError, OSError) as exc:
                print(f"mukv: error: {exc}", file=sys.stderr)
    finally:
        session.close()
    return 0

