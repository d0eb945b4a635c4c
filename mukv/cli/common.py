"""Helpers shared by the commands: model choice, parsing of options, opening stores, printing."""

from __future__ import annotations

import argparse
import json
import sys

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import InputError, MukvError, StoreError

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
        return requested, requested, (_RANDOM_NOTE if requested == RANDOM_MODEL else None)
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
    """``--config``: a JSON object, or the path of a JSON file holding one."""
    if raw is None:
        return None
    text = raw
    if not raw.lstrip().startswith("{"):
        p = Path(raw)
        if not p.is_file():
            raise InputError(f"{flag}: {raw!r} is neither a JSON object nor a JSON file")
        text = p.read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{flag}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, dict):
        raise InputError(f"{flag}: expected a JSON object; got {type(value).__name__}")
    return value


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
    return _backend_class(args.backend).peek_state(str(args.store), args.stream_id, "session")


def _open_store(args: argparse.Namespace, read_only: bool = False) -> "Session":
    """Open an existing stream of a store (one-line errors when it is not one). Commands that only read
    (ask, chat, inspect, plot) pass ``read_only``: they never take the stream's writer lock, so they
    never block (nor wait for) an ingest of the same stream."""
    from ..session import Session

    path = Path(args.store)
    if "://" not in str(args.store) and not path.exists():
        raise StoreError(f"{path}: no such store (create one with: mukv ingest {path} VIDEO)")
    kwargs: dict[str, Any] = {"backend": args.backend, "stream_id": args.stream_id, "read_only": read_only}
    options = _parse_config(getattr(args, "backend_options", None), "--backend-options")
    if options:
        kwargs["backend_options"] = options
    if getattr(args, "device", None):
        kwargs["device"] = args.device
    if getattr(args, "model", None):
        kwargs["model"] = args.model
    _quiet_transformers()
    return Session.open(args.store, **kwargs)


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
