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
    mukv plugins                            # what is registered, from which package

Every command has ``--help``. Errors are one line, ``mukv: error: ...``, with
exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Sequence

from ..errors import MukvError

from .plugins import _cmd_plugins
from .ingest import _cmd_ingest
from .ask import CHAT_HELP, _cmd_ask, _cmd_chat
from .inspect import _cmd_inspect
from .plot import _cmd_plot
from .demo import _cmd_demo
from .bench import BENCH_DESCRIPTION, _cmd_bench
from . import serve as _serve
from .common import EPILOG, RANDOM_MODEL, STORE_BACKEND, TRAINED_MODEL, _RANDOM_NOTE, pick_model  # noqa: F401
from .bench import BENCH_MODULE  # noqa: F401


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def _store_args(p: argparse.ArgumentParser, model: bool = False) -> None:
    p.add_argument("store", help="the store: a directory (or a URI the backend supports)")
    p.add_argument("--stream-id", default="default", help="which stream of the store (default: %(default)s)")
    p.add_argument("--backend", default=STORE_BACKEND, help="backend that wrote the store (default: %(default)s)")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (default: CUDA if available)")
    p.add_argument("--backend-options", metavar="JSON",
                   help='backend options as a JSON object or file, e.g. \'{"hot_bytes": 67108864}\'')
    if model:
        p.add_argument("--model", help="override the model recorded in the store (e.g. a checkpoint that moved)")


def _session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"a model preset or a local checkpoint directory "
                                   f"(default: {TRAINED_MODEL} if installed, else {RANDOM_MODEL})")
    p.add_argument("--policy", help="a registered policy: mukv (default), rekv, uniform, sliding_window, ...")
    p.add_argument("--config", help="configuration fields as a JSON object or a JSON file, applied over the policy")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (default: CUDA if available)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mukv`` command."""
    from .. import __version__
    from ..registry import ROLES

    parser = argparse.ArgumentParser(
        prog="mukv", formatter_class=_Formatter, epilog=EPILOG,
        description="Multi-grained KV-cache memory for long streaming video question answering.\n\n"
                    "Start with `mukv demo`.")
    parser.add_argument("--version", action="version", version=f"mukv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", formatter_class=_Formatter, help="the bundled model on a generated stream",
                       description="Render a synthetic stream, feed it to a session, ask the benchmark's questions "
                                   "as the stream reaches them, and print each answer beside the truth with the "
                                   "blocks retrieved per level, timings and memory.")
    p.add_argument("--minutes", type=float,
                   help=f"stream length in minutes (default: 20 with {RANDOM_MODEL} or on a GPU, else 3)")
    p.add_argument("--questions", type=int, help="questions to ask (default: 6 for 10 minutes or more, else 3)")
    p.add_argument("--seed", type=int, default=0, help="stream seed (default: %(default)s)")
    _session_args(p)
    p.add_argument("--max-new-tokens", type=int, default=3, help="answer length budget (default: %(default)s)")
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
    p.add_argument("--synthetic", type=float, metavar="MINUTES", help="also ingest MINUTES of a generated stream")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated stream (default: %(default)s)")
    p.add_argument("--fps", type=float, help="frames sampled per second (default: the configuration's, 0.5)")
    p.add_argument("--stream-id", default="default", help="which stream of the store (default: %(default)s)")
    p.add_argument("--backend", default=STORE_BACKEND, help="storage backend (default: %(default)s)")
    p.add_argument("--backend-options", metavar="JSON",
                   help='backend options as a JSON object or file, e.g. \'{"hot_bytes": 67108864}\'')
    _session_args(p)
    p.add_argument("--chunk", type=int, default=256, help="frames fed per call (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("ask", formatter_class=_Formatter, help="answer one question from a store",
                       description="Answer a question from a stored stream; print the answer, the retrieved "
                                   "blocks per level and timings.")
    _store_args(p, model=True)
    p.add_argument("question", help="the question")
    p.add_argument("--top-k", nargs="+", metavar="LEVEL=K", help="blocks per level, e.g. --top-k frame=16 segment=4")
    p.add_argument("--max-new-tokens", type=int, help="answer length budget (default: the configuration's)")
    p.add_argument("--plot", metavar="PNG", help="write the retrieval timeline as PNG")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.set_defaults(func=_cmd_ask)

    p = sub.add_parser("chat", formatter_class=_Formatter, help="interactive questions over a store",
                       description="Ask questions over a stored stream, one per line (stdin works too).\n\n"
                                   + CHAT_HELP)
    _store_args(p, model=True)
    p.add_argument("--max-new-tokens", type=int, help="answer length budget (default: the configuration's)")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("inspect", formatter_class=_Formatter, help="what a store holds, per level and tier",
                       description="Show a store's stream: model, configuration, and blocks, tokens and bytes per "
                                   "level and tier (hot, disk), as its backend reports them.")
    _store_args(p, model=True)
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.add_argument("--plot", metavar="PNG", help="write memory over stream time as PNG")
    p.add_argument("--verify", action="store_true",
                   help="check the store end to end (index rows, KV checksums, leftovers) without loading a model; "
                        "exit 1 if anything committed is damaged")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("plot", formatter_class=_Formatter, help="pictures as PNG: timeline, tokens, memory",
                       description="Pictures as PNG.")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    k = kinds.add_parser("tokens", formatter_class=_Formatter, help="token importance over one frame",
                         description="Heat maps of the attention, frequency and combined token scores of one frame "
                                     "and the tokens each one-frame level keeps.")
    k.add_argument("source", help="an image file, or a video file (with --at)")
    k.add_argument("-o", "--out", required=True, metavar="PNG", help="output file")
    k.add_argument("--at", type=float, metavar="SECONDS", help="time of the frame in a video (default: 0)")
    k.add_argument("--level", action="append", help="only this level (repeatable)")
    _session_args(k)
    k.set_defaults(func=_cmd_plot)
    k = kinds.add_parser("timeline", formatter_class=_Formatter, help="retrieval timeline of an answer",
                         description="Ask a question of a store and draw which blocks answered it.")
    _store_args(k, model=True)
    k.add_argument("question", help="the question")
    k.add_argument("-o", "--out", required=True, metavar="PNG", help="output file")
    k.add_argument("--max-new-tokens", type=int, help="answer length budget")
    k.set_defaults(func=_cmd_plot)
    k = kinds.add_parser("memory", formatter_class=_Formatter, help="memory of a store over stream time",
                         description="Bytes held per tier and level over stream time, as recorded by mukv ingest.")
    _store_args(k, model=True)
    k.add_argument("-o", "--out", required=True, metavar="PNG", help="output file")
    k.set_defaults(func=_cmd_plot)

    p = sub.add_parser("bench", formatter_class=_Formatter, add_help=False, help="run the evaluation harness",
                       description=BENCH_DESCRIPTION)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the harness")
    p.set_defaults(func=_cmd_bench)

    _serve.add_parser(sub)

    p = sub.add_parser("plugins", formatter_class=_Formatter,
                       help="list registered components and the package each comes from",
                       description="List every registered component: role, name, plugin and package. "
                                   "MUKV_PLUGINS=name1,name2 restricts which entry points load.")
    p.add_argument("--role", choices=list(ROLES), help="only this role")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after "bench" belongs to the harness
        args = argparse.Namespace(func=_cmd_bench, args=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (MukvError, OSError) as exc:
        print(f"mukv: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        print(f"mukv: error: missing package {exc.name!r}: pip install 'mukv[all]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mukv: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return textwrap.shorten(text, 600, placeholder=" ...")
