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
    mukv plugins                            # what is registered, from which package

Every command has ``--help``. Errors are one line, ``mukv: error: ...``, with
exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .errors import InputError, MukvError, StoreError

if TYPE_CHECKING:  # pragma: no cover
    from .session import Session

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
    from .registry import registry

    _quiet_transformers()
    if requested:
        return requested, requested, (_RANDOM_NOTE if requested == RANDOM_MODEL else None)
    if TRAINED_MODEL in registry().entries["models"]:
        import torch

        from .session import default_device, load_model

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
    from .registry import registry

    cls = registry().get("backends", name, field="backend")
    return cls


def _stored(args: argparse.Namespace) -> Any:
    """The session record of ``args.store`` / ``args.stream_id`` (``None``: no such stream)."""
    return _backend_class(args.backend).peek_state(str(args.store), args.stream_id, "session")


def _open_store(args: argparse.Namespace) -> "Session":
    """Open an existing stream of a store (one-line errors when it is not one)."""
    from .session import Session

    path = Path(args.store)
    if "://" not in str(args.store) and not path.exists():
        raise StoreError(f"{path}: no such store (create one with: mukv ingest {path} VIDEO)")
    kwargs: dict[str, Any] = {"backend": args.backend, "stream_id": args.stream_id}
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
    from .plots import format_time

    print(f"{indent}A: {answer.text or '(empty)'}")
    counts = answer.levels()
    print(f"{indent}retrieved: " + ", ".join(f"{n} {lv}" for lv, n in counts.items())
          + f" blocks; {answer.kv_tokens:,} KV tokens in the answer context")
    for level in counts:
        best = sorted((b for b in answer.blocks if b.level == level), key=lambda b: -b.score)[:per_level]
        shown = "  ".join(f"#{b.block_id} {format_time(b.t_start)}"
                          + (f"-{format_time(b.t_end)}" if b.t_end > b.t_start else "")
                          + f" ({b.score:.3f})" for b in best)
        print(f"{indent}  {level:<8} best: {shown}")
    t = answer.timings
    keys = [k for k in ("query", "retrieve", "page_in", "first_token", "total") if k in t]
    print(f"{indent}timings: " + ", ".join(f"{k} {t[k] * 1000:.1f} ms" for k in keys))
    for note in answer.notes:
        print(f"{indent}note: {note}")


# ------------------------------------------------------------------------------ plugins
def _cmd_plugins(args: argparse.Namespace) -> int:
    from .registry import ROLES, registry

    reg = registry()
    rows = [(e_role, e.name, e.plugin, e.package) for e_role in ROLES for e in
            (reg.entries[e_role][n] for n in sorted(reg.entries[e_role]))]
    if args.role:
        rows = [r for r in rows if r[0] == args.role]
    if args.json:
        print(json.dumps([dict(zip(("role", "name", "plugin", "package"), r)) for r in rows], indent=1))
        return 0
    print(_table(rows, ("role", "name", "plugin", "package")))
    return 0


# ------------------------------------------------------------------------------ ingest
def _cmd_ingest(args: argparse.Namespace) -> int:
    from .session import Session

    if not args.videos and args.synthetic is None:
        raise InputError("nothing to ingest: give video files, or --synthetic MINUTES for a generated stream")
    if args.synthetic is not None and args.synthetic <= 0:
        raise InputError(f"--synthetic takes a positive number of minutes; got {args.synthetic}")
    for v in args.videos:
        if not Path(v).is_file():
            raise InputError(f"video file not found: {v}")
    stored = _stored(args)
    if stored:
        if args.policy or args.config:
            raise InputError(f"{args.store}: stream {args.stream_id!r} exists and keeps its configuration; "
                             "drop --policy/--config, or use a new --stream-id")
        session = _open_store(args)
        _say(f"opened {args.store} (stream {args.stream_id!r}, {session.stats()['frames']:,} frames so far)")
    else:
        model, name, note = pick_model(args.model, args.device)
        if note:
            _say(note)
        session = Session(model=model, backend=args.backend, path=args.store, stream_id=args.stream_id,
                          policy=args.policy, config=_parse_config(args.config), device=args.device,
                          backend_options=_parse_config(args.backend_options, "--backend-options"))
        _say(f"created {args.store} (stream {args.stream_id!r}, model {name}, backend {args.backend})")
    t0 = time.perf_counter()
    before = session.stats()
    show = False if args.no_progress else None
    try:
        for video in args.videos:
            from .registry import registry

            source = registry().get("sources", "video", field="source")(
                video, fps=args.fps or session.config.stream.fps, chunk=args.chunk)
            _feed_chunks(session, source.chunks(), source.total, Path(video).name, source.fps, show)
        if args.synthetic is not None:
            from .bench import Stream, StreamSpec

            try:
                spec = StreamSpec(seed=args.seed, minutes=args.synthetic, fps=args.fps or session.config.stream.fps)
            except ValueError as exc:
                raise InputError(f"--synthetic: {exc}") from None
            stream = Stream(spec)
            chunks = ((frames, np.arange(start, start + len(frames), dtype=np.float64) / spec.fps)
                      for start, frames in stream.iter_frames(batch=args.chunk))
            _feed_chunks(session, chunks, stream.num_frames, f"synthetic (seed {args.seed})", spec.fps, show)
        session.backend.flush()
        after = session.stats()
        dt = time.perf_counter() - t0
        frames = after["frames"] - before["frames"]
        blocks = {k: v["blocks"] - before["levels"].get(k, {}).get("blocks", 0) for k, v in after["levels"].items()}
        print(f"ingested {frames:,} frames in {dt:.1f} s ({frames / max(dt, 1e-9):,.0f} frames/s): "
              + ", ".join(f"{n:,} {k}" for k, n in blocks.items()) + " blocks stored")
        from .plots import format_bytes, format_time

        print(f"{args.store}: {after['frames']:,} frames ({format_time(after['last_time'] or 0)} of stream), "
              f"{format_bytes(after['bytes'])} of KV")
    finally:
        session.close()
    return 0


def _feed_chunks(session: "Session", chunks, total: int, label: str, fps: float, show: bool | None) -> None:
    """Feed ``(frames, times from the source's start)`` chunks, continuing the stream's
    time, recording memory after each chunk, with a progress bar."""
    from . import plots

    last = session.stats()["last_time"]
    offset = 0.0 if last is None else last + 1.0 / fps
    bar = _bar(total, label, show)
    try:
        for frames, times in chunks:
            session.feed(frames, timestamps=offset + np.asarray(times, dtype=np.float64))
            plots.record_memory(session)
            bar.update(len(frames))
    finally:
        bar.close()


# ------------------------------------------------------------------------------ ask / chat
def _answer_json(answer) -> str:
    return json.dumps(dataclasses.asdict(answer), indent=1)


def _cmd_ask(args: argparse.Namespace) -> int:
    from . import plots

    session = _open_store(args)
    try:
        answer = session.ask(args.question, top_k=_parse_top_k(args.top_k), max_new_tokens=args.max_new_tokens)
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
    from . import plots

    session = _open_store(args)
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


# ------------------------------------------------------------------------------ inspect
def _inspect_rows(session: "Session") -> list[tuple]:
    """Rows (level, tier, blocks, tokens, bytes) of the store, levels in configuration order."""
    from .plots import format_bytes, level_tiers

    per_level = level_tiers(session.backend)
    rows = []
    for lp in session.levels:
        tiers = per_level.get(lp.level.name) or {"-": {"blocks": 0, "tokens": 0, "bytes": 0}}
        for tier, v in tiers.items():
            rows.append((lp.level.name, tier, f"{v['blocks']:,}", f"{v['tokens']:,}", format_bytes(v["bytes"])))
    return rows


def _print_inspect(session: "Session", args: argparse.Namespace) -> None:
    from .plots import format_bytes, format_time, memory_history, tier_bytes

    st = session.stats()
    stored = session.backend.get_state("session", {}) or {}
    print(f"store    {args.store}  (stream {args.stream_id!r}, backend {args.backend})")
    print(f"model    {stored.get('model', session.model.name)}  [{session.model.layout.model_id}]")
    print(f"stream   {st['frames']:,} frames, {format_time(st['last_time'] or 0)} of stream time")
    print(f"levels   {_levels_line(session.config)}")
    print(f"kv       {st['kv_bytes_per_token']:,} bytes per token (all layers, keys and values); "
          f"{format_bytes(st['bytes'])} stored in all")
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


def _cmd_inspect(args: argparse.Namespace) -> int:
    from . import plots

    if args.verify:  # end-to-end check of the store's files; needs no model
        from .backends.disk import verify_store

        report = verify_store(str(args.store), stream_id=args.stream_id)
        print(json.dumps(report.to_dict(), indent=1, default=str) if args.json else report.summary())
        return 0 if report.ok else 1
    session = _open_store(args)
    try:
        if args.json:
            st = session.stats()
            print(json.dumps({"store": str(args.store), "stream_id": args.stream_id, "backend": args.backend,
                              "frames": st["frames"], "last_time": st["last_time"],
                              "kv_bytes_per_token": st["kv_bytes_per_token"],
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


# ------------------------------------------------------------------------------ plot
def _read_image(path: str, at: float | None):
    """One RGB frame from an image file (PIL) or a video file (decord, at ``at`` seconds)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"file not found: {p}")
    if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(p) as im:
                return np.array(im.convert("RGB"))
        except UnidentifiedImageError:
            raise InputError(f"cannot read image {p}") from None
    from .frames import read_video

    _, chunks = read_video(p, fps=1.0, chunk=1)
    want = 0.0 if at is None else float(at)
    for frames, times in chunks:
        if float(times[0]) >= want - 0.5:
            return frames[0].numpy()
    raise InputError(f"video {p} is shorter than --at {want:g} s")


def _cmd_plot(args: argparse.Namespace) -> int:
    from . import plots
    from .session import Session

    if args.kind == "tokens":
        frame = _read_image(args.source, args.at)
        model, name, note = pick_model(args.model, args.device)
        if note:
            print(note)
        with Session(model=model, policy=args.policy, config=_parse_config(args.config), device=args.device) as s:
            out = plots.plot_token_importance(s, frame, args.out, levels=args.level or None,
                                              title=f"token importance: {Path(args.source).name} ({name})")
    elif args.kind == "timeline":
        session = _open_store(args)
        try:
            answer = session.ask(args.question, max_new_tokens=args.max_new_tokens)
            out = plots.plot_retrieval_timeline(answer, args.out, duration=session.stats()["last_time"])
        finally:
            session.close()
    else:  # memory
        session = _open_store(args)
        try:
            out = plots.plot_memory(plots.memory_history(session) or [plots.memory_snapshot(session)], args.out)
        finally:
            session.close()
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------ demo
#: Question kinds of the demo, ordered so that a few questions cover every level.
DEMO_KINDS = ("object_color", "motion", "mark_color", "count", "object_shape", "dot_color", "color_change",
              "object_place")

#: Kinds of the short clips the demo asks about first (one each).
DEMO_CLIP_KINDS = ("object_color", "motion", "count")


def _demo_clips(session, args: argparse.Namespace) -> int:
    """Part 1 of the demo: one question about each of a few short generated clips (8 frames,
    one questioned scene among others), each fed to a fresh session of the same model, so
    every block fits the answer's context. Returns how many were answered correctly."""
    from .bench import sample_clip, score
    from .session import Session

    print("1. short clips: 8 frames each, every block in the answer's context")
    right = 0
    for i, kind in enumerate(DEMO_CLIP_KINDS):
        clip = sample_clip(np.random.default_rng([args.seed, 8, i]), 8, kinds=(kind,))
        with Session(model=session.model, config=session.config, device=session.device) as s:
            s.feed(clip.frames)
            answer = s.ask(clip.question, max_new_tokens=args.max_new_tokens)
        ok = score(answer.text, clip.answer)
        right += ok
        _say(f"  Q: {clip.question}\n  A: {answer.text or '(empty)'!s:<12}  truth: {clip.answer:<10}  "
             f"{'correct' if ok else 'wrong'}  ({answer.kv_tokens:,} KV tokens)")
    print()
    return right


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import plots
    from .bench import Benchmark, score
    from .plots import format_bytes, format_time
    from .session import Session

    if args.minutes is not None and args.minutes <= 0:
        raise InputError(f"--minutes must be positive; got {args.minutes}")
    if args.questions is not None and args.questions < 1:
        raise InputError(f"--questions must be at least 1; got {args.questions}")
    config = _parse_config(args.config)
    from .config import MukvConfig

    # fail on a bad policy or configuration before loading a model
    MukvConfig.build(MukvConfig.from_policy(args.policy) if args.policy else None, **(config or {}))
    t0 = time.perf_counter()
    model, name, note = pick_model(args.model, args.device)
    session = Session(model=model, policy=args.policy, config=config, device=args.device)
    load_s = time.perf_counter() - t0
    # Sized to finish in about half a minute on a laptop CPU: the tiny random model
    # ingests a 20-minute stream in that time, a real (larger) model a few minutes.
    fast = name == RANDOM_MODEL or session.device.type == "cuda"
    minutes = args.minutes if args.minutes is not None else (20.0 if fast else 3.0)
    n_questions = args.questions if args.questions is not None else (6 if minutes >= 10 else 3)
    try:
        bench = Benchmark.generate(seed=args.seed, minutes=minutes, questions=n_questions, kinds=DEMO_KINDS,
                                   min_depth_s=min(60.0, minutes * 6.0))
    except ValueError as exc:
        session.close()
        raise InputError(f"cannot build the demo stream: {exc}") from None
    stream, fps = bench.stream, bench.spec.fps
    print("mukv demo: MuKV memory over a generated video stream, questions about moments long past")
    print(f"  stream   {minutes:g} min of video at {fps:g} fps = {stream.num_frames:,} frames "
          f"of {stream.size}x{stream.size} (seed {args.seed}), {len(bench.questions)} questions"
          + ("" if args.minutes is not None else "; --minutes N for another length"))
    print(f"  model    {name} on {session.device} (loaded in {load_s:.1f} s), "
          f"{session.model.tokens_per_frame} visual tokens per frame")
    print(f"  levels   {_levels_line(session.config)}")
    if note:
        print("  " + "\n  ".join(textwrap.wrap(note, 110)))
    print()
    clip_right = _demo_clips(session, args)
    print(f"2. {minutes:g} minutes of stream: questions about moments long past (MuKV retrieves their blocks)")
    results = []  # (question, answer, time asked)
    trace = []
    ingest_s = 0.0
    fed = 0
    bar = _bar(stream.num_frames, "streaming", False if args.no_progress else None)
    try:
        questions = sorted(bench.questions, key=lambda q: q.ask_frame)
        stops = sorted({q.ask_frame + 1 for q in questions} | {stream.num_frames})
        chunk = 64
        for stop in stops:
            while fed < stop:
                end = min(stop, fed + chunk)
                t = time.perf_counter()
                session.feed(stream.frames(fed, end))
                ingest_s += time.perf_counter() - t
                bar.update(end - fed)
                fed = end
                trace.append(plots.memory_snapshot(session))
            for q in (q for q in questions if q.ask_frame + 1 == stop):
                answer = session.ask(q.text, max_new_tokens=args.max_new_tokens)
                asked = float(session.stats()["last_time"])
                results.append((q, answer, asked))
                ok = score(answer.text, q.answer)
                hits = {}
                for level in answer.levels():
                    ranked = sorted((b for b in answer.blocks if b.level == level), key=lambda b: -b.score)
                    rank = next((i + 1 for i, b in enumerate(ranked)
                                 if b.frame_start < q.evidence_end and b.frame_end > q.evidence_start), None)
                    hits[level] = rank
                lines = [
                    f"[{format_time(asked)}] {q.id} ({q.level} evidence, "
                    f"{format_time(q.evidence_start / fps)}, asked {format_time(q.depth_s)} later)",
                    f"  Q: {q.text}",
                    f"  A: {answer.text or '(empty)'!s:<12}  truth: {q.answer:<10}  {'correct' if ok else 'wrong'}",
                    "  retrieved: " + ", ".join(f"{n} {lv}" for lv, n in answer.levels().items())
                    + f" blocks = {answer.kv_tokens:,} KV tokens, answered in {answer.timings['total'] * 1000:.0f} ms",
                    "  evidence scene among them: " + ", ".join(
                        f"{lv} {'rank ' + str(r) if r else 'no'}" for lv, r in hits.items()),
                ]
                _say("\n".join(lines))
    finally:
        bar.close()
    correct = sum(score(a.text, q.answer) for q, a, _ in results)
    st = session.stats()
    n = len(results)
    print()
    print("summary")
    noise = "  (random weights: expect noise)" if name == RANDOM_MODEL else ""
    print(f"  clips      {clip_right}/{len(DEMO_CLIP_KINDS)} correct (8-frame clips, every block in the answer's context)"
          + noise)
    print(f"  answers    {correct}/{n} correct on the stream" + noise)
    found = {}
    for q, a, _ in results:
        for level in a.levels():
            hit = any(b.level == level and b.frame_start < q.evidence_end and b.frame_end > q.evidence_start
                      for b in a.blocks)
            found.setdefault(level, []).append(hit)
    print("  evidence   questions whose scene was retrieved: "
          + ", ".join(f"{lv} {sum(v)}/{len(v)}" for lv, v in found.items()))
    blocks = ", ".join(f"{v['blocks']:,} {k}" for k, v in st["levels"].items())
    print(f"  ingest     {stream.num_frames:,} frames in {ingest_s:.1f} s "
          f"({stream.num_frames / max(ingest_s, 1e-9):,.0f} frames/s): {blocks} blocks")
    mean_ms = 1000 * float(np.mean([a.timings["total"] for _, a, _ in results]))
    mean_ret = 1000 * float(np.mean([a.timings["retrieve"] for _, a, _ in results]))
    print(f"  questions  {mean_ms:.0f} ms per answer on average (retrieval {mean_ret:.1f} ms)")
    stored_tokens = sum(v["tokens"] for v in st["levels"].values())
    raw_tokens = stream.num_frames * session.model.tokens_per_frame
    print("  memory     " + ", ".join(f"{k} {format_bytes(v['bytes'])}" for k, v in st["levels"].items())
          + f" = {format_bytes(st['bytes'])}")
    kv = int(np.mean([a.kv_tokens for _, a, _ in results]))
    print(f"  context    {kv:,} KV tokens per answer, from {stored_tokens:,} stored tokens "
          f"(the uncompressed stream is {raw_tokens:,} frame tokens)")
    outs = []
    if args.plot:
        q, a, asked = max(results, key=lambda r: r[0].depth_s)
        outs.append(plots.plot_retrieval_timeline(
            a, args.plot, duration=asked, evidence=(q.evidence_start / fps, (q.evidence_end - 1) / fps)))
    if args.plot_tokens:
        q = results[0][0]
        frame = stream.frame((q.evidence_start + q.evidence_end - 1) // 2)
        outs.append(plots.plot_token_importance(session, frame, args.plot_tokens,
                                                title=f"token importance, frame of {q.id}: {q.text}"))
    if args.plot_memory:
        outs.append(plots.plot_memory(trace, args.plot_memory))
    for out in outs:
        print(f"  wrote      {out}")
    if not outs:
        print("  pictures   mukv demo --plot timeline.png --plot-tokens tokens.png --plot-memory memory.png")
    session.close()
    return 0


# ------------------------------------------------------------------------------ bench
BENCH_MODULE = "mukv.bench.evaluate"


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    try:
        harness = importlib.import_module(BENCH_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name not in (BENCH_MODULE, "mukv.bench"):
            raise
        harness = None
    if harness is None or not callable(getattr(harness, "main", None)):
        if any(a in ("-h", "--help") for a in args.args):
            print(BENCH_DESCRIPTION)
            print(f"\nThe evaluation harness ({BENCH_MODULE}) is not available yet.")
            return 0
        raise MukvError(f"the evaluation harness is not available yet ({BENCH_MODULE}.main is missing); "
                        "meanwhile `mukv demo` runs the benchmark's questions on a generated stream")
    return int(harness.main(list(args.args)) or 0)


BENCH_DESCRIPTION = ("Run the evaluation harness of the synthetic benchmark (mukv.bench): policies and models "
                     "answer its questions; accuracy by kind, level and depth. Arguments are passed on to "
                     f"{BENCH_MODULE}; `mukv bench --help` shows them.")


# ------------------------------------------------------------------------------ parser
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
    from . import __version__
    from .registry import ROLES

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
