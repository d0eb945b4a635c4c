"""`mukv ingest`: add videos or a generated stream to a store.

Each chunk of frames is one transaction. Ctrl-C (SIGINT) or SIGTERM stops the command cleanly: the
chunk in flight is rolled back, everything before it is committed and made durable, the command says
what was stored and exits 130 (SIGINT) or 143 (SIGTERM). Running it again resumes: a file whose ingest
was interrupted continues at its first frame not stored, a file already stored in full is skipped
(``--force`` adds it again), frame indices and times continue the stream.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..frames import check_fps, video_size
from ..signals import Interrupted, deferred, interrupts_as_exceptions
from .common import _bar, _open_store, _say, _stored, new_session, store_backend


def _check_sizes(session, videos: list[str], resize: bool) -> None:
    """Refuse, before anything is stored, files whose frames differ in size from the stream's (or from
    the first file's, for a new stream), unless --resize."""
    if resize or not videos:
        return
    sizes = {v: video_size(v) for v in videos}
    want = session._stream.frame_hw or sizes[videos[0]]
    for v in videos:
        if sizes[v] != tuple(want):
            h, w = sizes[v]
            raise InputError(f"{v}: frames are {h}x{w}, the stream's are {want[0]}x{want[1]}; nothing was ingested. "
                             "Pass --resize to resize them to the stream's size, or use another --stream-id")


def _cmd_ingest(args: argparse.Namespace) -> int:
    if not args.videos and args.synthetic is None:
        raise InputError("nothing to ingest: give video files, or --synthetic MINUTES for a generated stream")
    if args.synthetic is not None and (not math.isfinite(args.synthetic) or args.synthetic <= 0):
        raise InputError(f"--synthetic takes a positive number of minutes; got {args.synthetic}")
    if args.fps is not None:
        check_fps(args.fps, what="--fps")
    for v in args.videos:
        if not Path(v).is_file():
            raise InputError(f"video file not found: {v}")
    stored = _stored(args)
    if stored:
        session = _open_store(args)  # --policy / --config: only what does not change how blocks are stored
        session.resize = args.resize
        _say(f"opened {args.store} (stream {args.stream_id!r}, {session.stats()['frames']:,} frames so far)")
    else:
        session, name, note = new_session(args, path=args.store, stream_id=args.stream_id)
        if note:
            _say(note)
        session.resize = args.resize
        _say(f"created {args.store} (stream {args.stream_id!r}, model {name}, backend {store_backend(args)})")
    t0 = time.perf_counter()
    before = session.stats()
    show = False if args.no_progress else None
    stopped: Interrupted | None = None
    try:
        _check_sizes(session, args.videos, args.resize)
        with interrupts_as_exceptions():
            try:
                _ingest_all(session, args, show)
            except Interrupted as exc:
                stopped = exc
        with deferred():  # a signal now (the last commit, the report) is delivered after the report
            session.flush()
            _report(session, args, before, time.perf_counter() - t0, stopped)
    finally:
        session.close()
    return stopped.exit_status if stopped is not None else 0


def _ingest_all(session, args: argparse.Namespace, show: bool | None) -> None:
    from .. import plots
    from ..ingest import AlreadyIngested

    fps = args.fps or session.config.stream.fps
    for video in args.videos:
        bar = _bar(None, Path(video).name, show)

        def chunk_done(frames: int, blocks: int) -> None:
            plots.record_memory(session)
            bar.update(frames)

        try:
            session.feed_from("video", video, fps=fps, upsample=args.upsample, force=args.force,
                              on_chunk=chunk_done, chunk=args.chunk)
        except AlreadyIngested as exc:
            _say(f"skipped {video}: {exc}")
        finally:
            bar.close()
    if args.synthetic is not None:
        from ..bench import Stream, StreamSpec

        try:
            spec = StreamSpec(seed=args.seed, minutes=args.synthetic, fps=fps)
        except ValueError as exc:
            raise InputError(f"--synthetic: {exc}") from None
        stream = Stream(spec)
        last = session.stats()["last_time"]
        offset = 0.0 if last is None else last + 1.0 / spec.fps
        bar = _bar(stream.num_frames, f"synthetic (seed {args.seed})", show)
        try:
            for start, frames in stream.iter_frames(batch=args.chunk):
                times = offset + np.arange(start, start + len(frames), dtype=np.float64) / spec.fps
                session.feed(frames, timestamps=times)
                plots.record_memory(session)
                bar.update(len(frames))
        finally:
            bar.close()


def _report(session, args: argparse.Namespace, before: dict, dt: float, stopped: Interrupted | None) -> None:
    from ..plots import format_bytes, format_time

    after = session.stats()
    frames = after["frames"] - before["frames"]
    blocks = {k: v["blocks"] - before["levels"].get(k, {}).get("blocks", 0) for k, v in after["levels"].items()}
    head = "ingested" if stopped is None else f"interrupted ({stopped}); committed"
    print(f"{head} {frames:,} frames in {dt:.1f} s ({frames / max(dt, 1e-9):,.0f} frames/s): "
          + ", ".join(f"{n:,} {k}" for k, n in blocks.items()) + " blocks stored")
    print(f"{args.store}: {after['frames']:,} frames ({format_time(after['last_time'] or 0)} of stream), "
          f"{format_bytes(after['bytes'])} of KV")
    if stopped is not None:
        print(f"run the same command again to resume (the next frame is stream frame {after['frames']:,})")
