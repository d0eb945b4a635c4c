"""The ``mukv`` command line.

::

    mukv demo                               # the bundled model on a generated stream
    mukv ingest STORE video.mp4             # add a video to a store (created on first use)
    mukv ingest STORE --synthetic 600       # ... or ten hours of a generated stream
    mukv ask STORE "what color was the car?" --plot timeline.png
    mukv chat STORE                         # questions from the terminal, one per line
    mukv inspect STORE --plot memory.png    # what a store holds, per level and tier
    mukv plot tokens frame.png -o tokens.png
    mukv bench ...                          # the evaluation harness
    mukv serve STORE                        # HTTP API, live ingest and a web page at http://127.0.0.1:8000/
    mukv plugins                            # what is registered, from which package (and what is broken)
    mukv config show                        # the effective configuration and where each value came from
    mukv logs STORE                         # the store's question log
    mukv streams list STORE                 # the streams of a store (also delete, export, import)
    mukv repair STORE                       # what a repair would do to streams that do not add up

Every command has ``--help``; ``-v``/``-vv``/``-q``/``--log-json`` set what is logged on
stderr. Errors are one line, ``mukv: error: ...``, with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Sequence

from ..errors import MukvError
from ..signals import Interrupted, interrupts_as_exceptions

from .plugins import _cmd_plugins
from .ingest import _cmd_ingest
from .ask import CHAT_HELP, _cmd_ask, _cmd_chat
from .inspect import _cmd_inspect
from .plot import _cmd_plot
from .demo import _cmd_demo
from .bench import BENCH_DESCRIPTION, _cmd_bench
from .config import CONFIG_DESCRIPTION, _cmd_config_show
from .logs import LOGS_DESCRIPTION, _cmd_logs
from . import serve as _serve
from .common import EPILOG, RANDOM_MODEL, STORE_BACKEND, TRAINED_MODEL, _RANDOM_NOTE, pick_model  # noqa: F401
from .streams import add_parsers as add_stream_parsers
from .common import OneLineParser, non_negative_float, positive_float, positive_int, time_arg
from .common import add_log_options, add_session_options
from .bench import BENCH_MODULE  # noqa: F401


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def _store_args(p: argparse.ArgumentParser, questions: bool = False, stream_default: str | None = "default") -> None:
    p.add_argument("store", help="the store: a directory (or a URI the backend supports)")
    p.add_argument("--stream-id", default=stream_default,
                   help="which stream of the store (default: " + (stream_default or "default; with --verify: every "
                                                                                     "stream") + ")")
    p.add_argument("--backend", help=f"backend that wrote the store (default: {STORE_BACKEND})")
    p.add_argument("--backend-options", metavar="JSON",
                   help='backend options as a JSON object or file, e.g. \'{"hot_bytes": 67108864}\'')
    add_session_options(p, new=False, questions=questions)


def _session_args(p: argparse.ArgumentParser) -> None:
    add_session_options(p, new=True)


class _Parser(OneLineParser):
    """Every command takes the logging options, before or after its name."""

    def add_subparsers(self, **kwargs):  # type: ignore[override]
        action = super().add_subparsers(**kwargs)
        original = action.add_parser

        def add_parser(name, **kw):
            kw.setdefault("formatter_class", _Formatter)
            sub = original(name, **kw)
            if kw.get("add_help", True):
                add_log_options(sub)
            return sub

        action.add_parser = add_parser  # type: ignore[method-assign]
        return action


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mukv`` command."""
    from .. import __version__
    from ..registry import ROLES

    parser = _Parser(
        prog="mukv", formatter_class=_Formatter, epilog=EPILOG,
        description="Multi-grained KV-cache memory for long streaming video question answering.\n\n"
                    "Start with `mukv demo`.")
    parser.add_argument("--version", action="version", version=f"mukv {__version__}")
    add_log_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("demo", formatter_class=_Formatter, help="the bundled model on a generated stream",
                       description="Render a synthetic stream, feed it to a session, ask the benchmark's questions "
                                   "as the stream reaches them, and print each answer beside the truth with the "
                                   "blocks retrieved per level, timings and memory.")
    p.add_argument("--minutes", type=positive_float,
                   help=f"stream length in minutes (default: 20 with {RANDOM_MODEL} or on a GPU, else 3)")
    p.add_argument("--questions", type=positive_int, help="questions to ask (default: 6 for 10 minutes or more, else 3)")
    p.add_argument("--seed", type=int, default=0, help="stream seed (default: %(default)s)")
    _session_args(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=3, help="answer length budget (default: %(default)s)")
    p.add_argument("--plot", metavar="PNG", help="write the retrieval timeline of the deepest question")
    p.add_argument("--plot-tokens", metavar="PNG", help="write the token-importance heat map of an evidence frame")
    p.add_argument("--plot-memory", metavar="PNG", help="write memory over stream time")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("ingest", formatter_class=_Formatter, help="add videos or a generated stream to a store",
                       description="Add video files (sampled at --fps) or a generated stream to a store. The store "
                                   "is created on first use; later runs continue its stream where it stopped.")
    p.add_argument("store", help="the store directory (created if missing)")
    p.add_argument("videos", nargs="*", metavar="VIDEO", help="video files, read in order")
    p.add_argument("--synthetic", type=positive_float, metavar="MINUTES", help="also ingest MINUTES of a generated stream")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated stream (default: %(default)s)")
    p.add_argument("--fps", type=positive_float,
                   help="frames sampled per second, at most the video's own rate (default: the configuration's, 0.5)")
    p.add_argument("--upsample", action="store_true", help="allow --fps above a video's own rate (frames repeat)")
    p.add_argument("--resize", action="store_true",
                   help="resize frames of another size to the stream's (recorded per source) instead of refusing")
    p.add_argument("--force", action="store_true", help="ingest a file the stream already holds (same content)")
    p.add_argument("--stream-id", default="default", help="which stream of the store (default: %(default)s)")
    p.add_argument("--backend", help=f"storage backend (default: {STORE_BACKEND})")
    p.add_argument("--backend-options", metavar="JSON",
                   help='backend options as a JSON object or file, e.g. \'{"hot_bytes": 67108864}\'')
    _session_args(p)
    p.add_argument("--chunk", type=positive_int, default=256,
                   help="frames per transaction (default: %(default)s); Ctrl-C keeps every finished one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("ask", formatter_class=_Formatter, help="answer one question from a store",
                       description="Answer a question from a stored stream; print the answer, the retrieved "
                                   "blocks per level and timings.")
    _store_args(p, questions=True)
    p.add_argument("question", help="the question")
    p.add_argument("--top-k", nargs="+", metavar="LEVEL=K", help="blocks per level, e.g. --top-k frame=16 segment=4")
    p.add_argument("--since", type=time_arg, metavar="TIME",
                   help="answer from blocks at or after TIME: stream seconds, or an ISO 8601 time for a stream with "
                        "a wall-clock origin")
    p.add_argument("--until", type=time_arg, metavar="TIME", help="answer from blocks at or before TIME (as --since)")
    p.add_argument("--max-new-tokens", type=positive_int, help="answer length budget (default: the configuration's)")
    p.add_argument("--plot", metavar="PNG", help="write the retrieval timeline as PNG")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.set_defaults(func=_cmd_ask)

    p = sub.add_parser("chat", formatter_class=_Formatter, help="interactive questions over a store",
                       description="Ask questions over a stored stream, one per line (stdin works too).\n\n"
                                   + CHAT_HELP)
    _store_args(p, questions=True)
    p.add_argument("--max-new-tokens", type=positive_int, help="answer length budget (default: the configuration's)")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("inspect", formatter_class=_Formatter, help="what a store holds, per level and tier",
                       description="Show a store's stream: model, configuration, and blocks, tokens and bytes per "
                                   "level and tier (hot, disk), as its backend reports them.")
    _store_args(p, stream_default=None)
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.add_argument("--plot", metavar="PNG", help="write memory over stream time as PNG")
    p.add_argument("--verify", action="store_true",
                   help="check the store end to end (index rows, KV checksums, frame ranges and times, state against "
                        "data, leftovers) without loading a model; every stream unless --stream-id is given; exit 1 "
                        "if anything is damaged")
    p.add_argument("--repair", action="store_true",
                   help="with --verify: show what `mukv repair` would do about what was found (apply it with --yes)")
    p.add_argument("--yes", action="store_true", help="with --repair: do it")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("plot", formatter_class=_Formatter, help="pictures as PNG: timeline, tokens, memory",
                       description="Pictures as PNG.")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND", parser_class=_Parser)
    k = kinds.add_parser("tokens", formatter_class=_Formatter, help="token importance over one frame",
                         description="Heat maps of the attention, frequency and combined token scores of one frame "
                                     "and the tokens each one-frame level keeps.")
    k.add_argument("source", help="an image file, or a video file (with --at)")
    k.add_argument("-o", "--out", required=True, metavar="PNG", help="output file")
    k.add_argument("--at", type=non_negative_float, metavar="SECONDS", help="time of the frame in a video (default: 0)")
    k.add_argument("--level", action="append", help="only this level (repeatable)")
    _session_args(k)
    k.set_defaults(func=_cmd_plot)
    k = kinds.add_parser("timeline", formatter_class=_Formatter, help="retrieval timeline of an answer",
                         description="Ask a question of a store and draw which blocks answered it.")
    _store_args(k, questions=True)
    k.add_argument("question", help="the question")
    k.add_argument("-o", "--out", required=True, metavar="PNG", help="output file")
    k.add_argument("--max-new-tokens", type=positive_int, help="answer length budget")
    k.set_defaults(func=_cmd_plot)
    k = kinds.add_parser("memory", formatter_class=_Formatter, help="memory of a store over stream time",
                         description="Bytes held per tier and level over stream time, as recorded by mukv ingest.")
    _store_args(k)
    k.add_argument("-o", "--out", required=True, metavar="PNG", help="output file")
    k.set_defaults(func=_cmd_plot)

    p = sub.add_parser("bench", formatter_class=_Formatter, add_help=False, help="run the evaluation harness",
                       description=BENCH_DESCRIPTION)
    p.add_argument("--policy", help="run this policy only (a name, or a JSON object with settings)")
    p.add_argument("--config", metavar="JSON|FILE", help="configuration fields applied over every policy's")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the harness")
    p.set_defaults(func=_cmd_bench)

    _serve.add_parser(sub)

    p = sub.add_parser("plugins", formatter_class=_Formatter,
                       help="list registered components and the package each comes from",
                       description="List every registered component: role, name, plugin and package. "
                                   "MUKV_PLUGINS=name1,name2 restricts which entry points load.")
    p.add_argument("--role", choices=list(ROLES), help="only this role")
    p.add_argument("--json", action="store_true", help="print as JSON (with each component's settings and their "
                                                       "defaults, and the broken plugins with their errors)")
    p.set_defaults(func=_cmd_plugins)

    add_stream_parsers(sub, _Formatter, _Parser)

    p = sub.add_parser("config", help="the effective configuration and where each value came from",
                       description=CONFIG_DESCRIPTION)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    k = actions.add_parser("show", help="print the effective configuration and the source of every value",
                           description=CONFIG_DESCRIPTION)
    k.add_argument("store", nargs="?", help="a store: show the configuration of its stream with the overrides "
                                            "a command would apply (loads its model)")
    k.add_argument("--stream-id", default="default", help="which stream of the store (default: %(default)s)")
    k.add_argument("--backend", help=f"backend of the store (default: {STORE_BACKEND})")
    k.add_argument("--backend-options", metavar="JSON", help="backend options as a JSON object or file")
    add_session_options(k, new=True)
    k.add_argument("--json", action="store_true", help="print as JSON")
    k.set_defaults(func=_cmd_config_show)

    p = sub.add_parser("logs", help="the question log of a store", description=LOGS_DESCRIPTION)
    p.add_argument("store", help="the store: a directory or an s3:// URI")
    p.add_argument("--stream-id", default="default", help="which stream of the store (default: %(default)s)")
    p.add_argument("-n", "--count", type=int, default=3, help="how many of the newest records (0: all; default 3)")
    p.add_argument("--query", metavar="TEXT", help="only records whose question or answer contains this text")
    p.add_argument("-m", "--model", help="only records answered by this model")
    p.add_argument("--config-hash", metavar="HASH", help="only records made with this configuration (a prefix "
                                                         "of its hash)")
    p.add_argument("--since", metavar="TIME", help="only records from this time on (ISO date/time, UTC, or Unix "
                                                   "seconds)")
    p.add_argument("--until", metavar="TIME", help="only records up to this time")
    p.add_argument("--show-config", action="store_true", help="print the configuration of each record too")
    p.add_argument("--backend-options", metavar="JSON",
                   help='options with the storage_options of an s3:// store, as a JSON object or file')
    p.add_argument("--json", action="store_true", help="print the records as a JSON array")
    p.set_defaults(func=_cmd_logs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from ..log import configure_logging, log_error, restore_logging

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    lead = _leading_log_options(argv)
    if len(argv) > lead and argv[lead] == "bench":  # everything after "bench" belongs to the harness
        only_logging = argparse.ArgumentParser(prog="mukv", add_help=False)
        add_log_options(only_logging, top=True)
        args = only_logging.parse_args(argv[:lead])
        args.func, args.args = _cmd_bench, argv[lead + 1:]
    else:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # a usage error, already printed as one line: the exit status (--help exits)
            if exc.code in (0, None):
                raise
            return exc.code if isinstance(exc.code, int) else 2
    handler = configure_logging(getattr(args, "verbose", 0) - (1 if getattr(args, "quiet", False) else 0),
                                json_lines=getattr(args, "log_json", False))
    try:
        with interrupts_as_exceptions():  # SIGTERM stops a command as Ctrl-C does: cleanly, exit 143
            return args.func(args)
    except (MukvError, OSError) as exc:
        return _fail(_one_line(exc), args, log_error)
    except ModuleNotFoundError as exc:
        return _fail(f"missing package {exc.name!r}: pip install 'mukv[all]'", args, log_error)
    except Interrupted as exc:
        print(f"mukv: interrupted ({exc})", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("mukv: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug, not bad input: one line, the traceback on request
        if os.environ.get("MUKV_TRACEBACK"):
            raise
        print(f"mukv: internal error: {type(exc).__name__}: {_one_line(exc)} (set MUKV_TRACEBACK=1 for the "
              "traceback)", file=sys.stderr)
        return 1
    finally:
        restore_logging(handler)


def _leading_log_options(argv: list[str]) -> int:
    """How many of the first arguments are logging options (they may come before the command)."""
    i = 0
    while i < len(argv) and (argv[i] in ("-q", "--quiet", "--log-json", "--verbose") or
                             (argv[i].startswith("-v") and set(argv[i][1:]) == {"v"})):
        i += 1
    return i


def _fail(message: str, args: argparse.Namespace, log_error) -> int:
    if getattr(args, "log_json", False):
        log_error(message)
    else:
        print(f"mukv: error: {message}", file=sys.stderr)
    return 2


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return textwrap.shorten(text, 600, placeholder=" ...")
