"""`mukv plot`: pictures as PNG (timeline, tokens, memory)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..errors import InputError

from .common import _open_store, new_session


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
    from ..frames import read_video

    _, chunks = read_video(p, fps=1.0, chunk=1)
    want = 0.0 if at is None else float(at)
    for frames, times in chunks:
        if float(times[0]) >= want - 0.5:
            return frames[0].numpy()
    raise InputError(f"video {p} is shorter than --at {want:g} s")


def _cmd_plot(args: argparse.Namespace) -> int:
    from .. import plots

    if args.kind == "tokens":
        frame = _read_image(args.source, args.at)
        s, name, note = new_session(args)
        if note:
            print(note)
        with s:
            out = plots.plot_token_importance(s, frame, args.out, levels=args.level or None,
                                              title=f"token importance: {Path(args.source).name} ({name})")
    elif args.kind == "timeline":
        session = _open_store(args, read_only=True)
        try:
            answer = session.ask(args.question, max_new_tokens=args.max_new_tokens)
            out = plots.plot_retrieval_timeline(answer, args.out, duration=session.stats()["last_time"])
        finally:
            session.close()
    else:  # memory
        session = _open_store(args, read_only=True)
        try:
            out = plots.plot_memory(plots.memory_history(session) or [plots.memory_snapshot(session)], args.out)
        finally:
            session.close()
    print(f"wrote {out}")
    return 0

