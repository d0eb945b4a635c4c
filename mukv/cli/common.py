"""Helpers shared by the commands: model choice, parsing of options, opening stores, printing."""

from __future__ import annotations

import argparse
import sys

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import ConfigError, InputError, MukvError, StoreError

if TYPE_CHECKING:  # pragma: no cover
    from ..session import Session

#: The model ``demo`` and new stores use when it is registered (a trained tiny model).
TRAINED_MODEL = "mukv-tiny"
#: The fallback: the same architecture with random weights.
RANDOM_MODEL = "tiny-llava-ov"
#: Backend of stores named by a path.
STORE_BACKEND = "lancedb"

EPILOG = "Documentation: the docs/ folder (mkdocs serve), or docs/reference/cli.md."


# ------------------------------------------------------------------------------ helpers
def _say(*parts: Any) -> None:
    """Print to stdout without breaking an active progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(" ".join(str(p) for p in parts), file=sys.stdout)
    except ImportError:  # pragma: no cover
        print(*parts)


def _bar(total: int, desc: str, enabled: bool | None):
    from tqdm.auto import tqdm

    # enabled None: a bar only on a terminal
    return tqdm(total=total, desc=desc, unit="frame", disable=None if enabled is None else not enabled,
                file=sys.stderr, dynamic_ncols=True, leave=False)


def pick_model(requested: str | None, device: str | None = None) -> tuple[Any, str, str | None]:
    """The model a new session uses: ``(model argument, display name, note or None)``.

    An explicit ``--model`` is used as given. Otherwise the trained "mukv-tiny"
    when it is registered and loads, else "tiny-llava-ov" (random weights) with a
    note saying why.
    """
    from ..registry import registry

    _quiet_transformers()
    if requested:
        label = requested if isinstance(requested, str) else str(requested.get("name", requested))
        return requested, label, (_RANDOM_NOTE if label == RANDOM_MODEL else None)
    if TRAINED_MODEL in registry().entries["models"]:
        import torch

        from ..session import default_device, load_model

        try:
            dev = torch.device(device) if device else default_device()
            return load_model(TRAINED_MODEL, dev, None), TRAINED_MODEL, None
        except MukvError as exc:
            reason = f"{TRAINED_MODEL} cannot be loaded ({textwrap.shorten(str(exc).split(';')[0], 160)})"
    else:
        reason = f"{TRAINED_MODEL} is not installed"
    return RANDOM_MODEL, RANDOM_MODEL, f"note: {reason}; using {RANDOM_MODEL}. " + _RANDOM_NOTE[len("note: "):]


def _quiet_transformers() -> None:
    """No "Loading weights" progress bars from transformers in the command's output."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


_RANDOM_NOTE = (f"note: {RANDOM_MODEL} has random weights, so its answers are noise; retrieval, compression "
                "and memory are real.")


def _parse_config(raw: str | None, flag: str = "--config") -> dict[str, Any] | None:
    """``--config`` / ``--backend-options``: an inline JSON object, or a JSON, TOML or YAML file holding one."""
    from ..settings import parse_object

    return parse_object(raw, flag)


# ------------------------------------------------------------------------------ options every command shares
def add_log_options(p: argparse.ArgumentParser, top: bool = False) -> None:
    """``-v/-vv``, ``-q`` and ``--log-json``: on the main parser (``top``) and on every command, so
    they may come before or after the command's name."""
    default = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    g = p.add_argument_group("logging")
    g.add_argument("-v", "--verbose", action="count", default=default(0),
                   help="more log lines on stderr: -v info, -vv debug")
    g.add_argument("-q", "--quiet", action="store_true", default=default(False),
                   help="only errors on stderr (no warnings, no notes)")
    g.add_argument("--log-json", action="store_true", default=default(False),
                   help="log lines (and the final error) as JSON objects, one per line")


def add_session_options(p: argparse.ArgumentParser, *, new: bool, questions: bool = False) -> None:
    """The options that choose a session: ``--model``, ``--policy``, ``--config``, ``--device``,
    and ``--log-questions`` for commands that answer questions. ``new``: the command builds a
    session (else it opens a stored stream, whose model is recorded)."""
    if new:
        p.add_argument("--model", help=f"a model preset or a local checkpoint directory, or a JSON object with "
                                       f"settings (default: {TRAINED_MODEL} if installed, else {RANDOM_MODEL})")
    else:
        p.add_argument("--model", help="override the model recorded in the store (e.g. a checkpoint that moved)")
    p.add_argument("--policy", help="a registered policy: mukv (default), rekv, uniform, sliding_window, ... "
                                    """or a JSON object with settings, e.g. '{"name": "rekv", "top_k": 32}'"""
                                    + ("" if new else "; on a stored stream only its retrieval, assembly and "
                                                      "generation fields may differ"))
    p.add_argument("--config", metavar="JSON|FILE",
                   help="configuration fields as inline JSON or a JSON, TOML or YAML file, applied over the policy"
                        + ("" if new else "; on a stored stream only top_k, rerank weights, retrieval, assembly "
                                          "and generation may change"))
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (default: CUDA if available)")
    if questions:
        p.add_argument("--log-questions", action="store_true", default=None,
                       help="keep every question and answer in the store's question log (mukv logs STORE)")


def user_settings(args: argparse.Namespace, reopen: bool) -> Any:
    """The command's settings: its options over ``MUKV_*`` variables over the user file
    (:func:`mukv.settings.effective`)."""
    from ..settings import effective, parse_spec

    cli = {
        "model": parse_spec(getattr(args, "model", None), "--model"),
        "policy": parse_spec(getattr(args, "policy", None), "--policy"),
        "config": _parse_config(getattr(args, "config", None)),
        "device": getattr(args, "device", None),
        "backend": getattr(args, "backend", None),
        "backend_options": _parse_config(getattr(args, "backend_options", None), "--backend-options"),
        "question_log": getattr(args, "log_questions", None),
    }
    return effective(cli, reopen=reopen)


def new_session(args: argparse.Namespace, path: str | None = None, stream_id: str = "default",
                model: Any = None) -> tuple["Session", str, str | None]:
    """A new session from the command's options and the user's settings: ``(session, model name,
    note or None)``. ``model`` (an adapter) skips choosing and loading one."""
    from ..config import MukvConfig
    from ..session import Session

    eff = user_settings(args, reopen=False)
    v = eff.values
    # a bad policy or configuration fails before a model loads
    MukvConfig.build(MukvConfig.from_policy(v["policy"]) if v["policy"] is not None else None, **eff.config)
    if model is None:
        model, name, note = pick_model(v["model"], v["device"])
    else:
        name, note = getattr(model, "name", "model"), None
    kwargs: dict[str, Any] = {"model": model, "policy": v["policy"], "config": eff.config or None, "device": v["device"]}
    if path is not None:
        kwargs.update(backend=v["backend"] or STORE_BACKEND, path=path, stream_id=stream_id,
                      backend_options=v["backend_options"] or None, log_questions=bool(v["question_log"]))
    return Session(**kwargs), name, note


def store_backend(args: argparse.Namespace) -> str:
    """The backend of the command's store: ``--backend``, else the user's settings, else lancedb."""
    return user_settings(args, reopen=True).values["backend"] or STORE_BACKEND
def _parse_top_k(items: Sequence[str] | None) -> dict[str, int] | None:
    if not items:
        return None
    out: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().lstrip("-").isdigit():
            raise InputError(f"--top-k takes LEVEL=K (e.g. frame=16); got {item!r}")
        out[name.strip()] = int(value)
    return out


def _backend_class(name: str):
    from ..registry import registry

    cls = registry().get("backends", name, field="backend")
    return cls


def _stored(args: argparse.Namespace) -> Any:
    """The session record of ``args.store`` / ``args.stream_id`` (``None``: no such stream)."""
    eff = user_settings(args, reopen=True)
    return _backend_class(eff.values["backend"] or STORE_BACKEND).peek_state(
        str(args.store), args.stream_id, "session", **(eff.values["backend_options"] or {}))


def _open_store(args: argparse.Namespace, read_only: bool = False) -> "Session":
    """Open an existing stream of a store (one-line errors when it is not one), with the
    command's ``--policy`` / ``--config`` (and the user's retrieval, assembly and generation
    settings) applied over the stream's own configuration: anything that changes how blocks
    are stored is an error naming the fields (the stream's contract). Commands that only read
    (ask, chat, inspect, plot) pass ``read_only``: they never take the stream's writer lock, so they
    never block (nor wait for) an ingest of the same stream."""
    from ..config import merge, policy_fields
    from ..session import Session

    path = Path(args.store)
    if "://" not in str(args.store) and not path.exists():
        raise StoreError(f"{path}: no such store (create one with: mukv ingest {path} VIDEO)")
    eff = user_settings(args, reopen=True)
    v = eff.values
    kwargs: dict[str, Any] = {"backend": v["backend"] or STORE_BACKEND, "stream_id": args.stream_id,
                              "read_only": read_only}
    if v["backend_options"]:
        kwargs["backend_options"] = v["backend_options"]
    if v["device"]:
        kwargs["device"] = v["device"]
    if getattr(args, "model", None):  # only the command line overrides the model a stream recorded
        from ..settings import parse_spec

        kwargs["model"] = parse_spec(args.model, "--model")
    if v["question_log"] and hasattr(args, "log_questions"):
        kwargs["log_questions"] = True
    _quiet_transformers()
    overrides = merge(policy_fields(v["policy"], "--policy") if v["policy"] is not None else {}, eff.config)
    try:
        return Session.open(args.store, config=overrides or None, **kwargs)
    except ConfigError as exc:
        if not overrides or "contract" not in str(exc):
            raise
        sources = [src for src, _ in eff.config_layers] + (["--policy"] if v["policy"] is not None else [])
        raise ConfigError(f"{args.store} (stream {args.stream_id!r}) keeps the configuration it was stored with: "
                          f"{exc} (given by {', '.join(sources)}); a new --stream-id starts a stream with its own"
                          ) from None


def _levels_line(config) -> str:
    parts = []
    for lv in config.levels:
        size = f"{lv.tokens} tok" if lv.tokens else ("frame" if lv.frames == 1 else f"{lv.frames} frames")
        parts.append(f"{lv.name} ({size}, keep {lv.keep_ratio:g}, top-{lv.top_k})")
    return ", ".join(parts)


def _table(rows: list[Sequence[Any]], header: Sequence[str], right: Sequence[int] = ()) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        lines.append("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip())
    return "\n".join(lines)


def _print_answer(answer, indent: str = "", per_level: int = 3) -> None:
    from ..plots import format_time

    print(f"{indent}A: {answer.text or '(empty)'}")
    if getattr(answer, "window", None):
        lo, hi = answer.window
        print(f"{indent}window: stream seconds {'-' if lo is None else f'{lo:g}'} .. {'-' if hi is None else f'{hi:g}'}")
    counts = answer.levels()
    print(f"{indent}retrieved: " + ", ".join(f"{n} {lv}" for lv, n in counts.items())
          + f" blocks; {answer.kv_tokens:,} KV tokens in the answer context")
    for level in counts:
        best = sorted((b for b in answer.blocks if b.level == level), key=lambda b: -b.score)[:per_level]
        shown = "  ".join(f"#{b.block_id} {format_time(b.t_start)}"
                          + (f"-{format_time(b.t_end)}" if b.t_end > b.t_start else "")
                          + (f" [{b.wall_start}]" if getattr(b, "wall_start", None) else "")
                          + f" ({b.score:.3f})" for b in best)
        print(f"{indent}  {level:<8} best: {shown}")
    t = answer.timings
    keys = [k for k in ("query", "retrieve", "page_in", "first_token", "total") if k in t]
    print(f"{indent}timings: " + ", ".join(f"{k} {t[k] * 1000:.1f} ms" for k in keys))
    for note in answer.notes:
        print(f"{indent}note: {note}")



class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``mukv: error: ...``, exit status 2 (also for
    subcommands and the harness)."""

    def error(self, message: str):  # type: ignore[override]
        cmd = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, f"mukv: error: {cmd}{message} (see: {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def time_arg(text: str) -> "float | str":
    """argparse type of --since/--until: stream seconds, or an ISO 8601 time (kept as text)."""
    import math

    try:
        value = float(text)
    except ValueError:
        if len(text) > 64:
            raise argparse.ArgumentTypeError("expected stream seconds or an ISO 8601 time") from None
        return text
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds, got {text!r}")
    return value
