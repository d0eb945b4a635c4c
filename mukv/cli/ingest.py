"""`mukv ingest`: add videos or a generated stream to a store."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputError
from .common import _bar, _open_store, _say, _stored, new_session, store_backend


def _cmd_ingest(args: argparse.Namespace) -> int:
    if not args.videos and args.synthetic is None:
        raise InputError("nothing to ingest: give video files, or --synthetic MINUTES for a generated stream")
    if args.synthetic is not None and args.synthetic <= 0:
        raise InputError(f"--synthetic takes a positive number of minutes; got {args.synthetic}")
    for v in args.videos:
        if not Path(v).is_file():
            raise InputError(f"video file not found: {v}")
    stored = _stored(args)
    if stored:
        session = _open_store(args)  # --policy / --config: only what does not change how blocks are stored
        _say(f"opened {args.store} (stream {args.stream_id!r}, {session.stats()['frames']:,} frames so far)")
    else:
        session, name, note = new_session(args, path=args.store, stream_id=args.stream_id)
        if note:
            _say(note)
        _say(f"created {args.store} (stream {args.stream_id!r}, model {name}, backend {store_backend(args)})")
    t0 = time.perf_counter()
    before = session.stats()
    show = False if args.no_progress else None
    try:
        for video in args.videos:
            from ..registry import registry

            source = registry().get("sources", "video", field="source")(
                video, fps=args.fps or session.config.stream.fps, chunk=args.chunk)
            _feed_chunks(session, source.chunks(), source.total, Path(video).name, source.fps, show)
        if args.synthetic is not None:
            from ..bench import Stream, StreamSpec

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
        from ..plots import format_bytes, format_time

        print(f"{args.store}: {after['frames']:,} frames ({format_time(after['last_time'] or 0)} of stream), "
              f"{format_bytes(after['bytes'])} of KV")
    finally:
        session.close()
    return 0


def _feed_chunks(session: "Session", chunks, total: int, label: str, fps: float, show: bool | None) -> None:
    """Feed ``(frames, times from the source's start)`` chunks, continuing the stream's
    time, recording memory after each chunk, with a progress bar."""
    from .. import plots

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

