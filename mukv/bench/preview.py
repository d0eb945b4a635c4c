"""Write a PNG contact sheet of benchmark frames with their question and answer.

Usage::

    python -m mukv.bench.preview OUT.png                       # 6 random clips
    python -m mukv.bench.preview OUT.png --seed 3 --clips 4 --frames 10
    python -m mukv.bench.preview OUT.png --kind motion --kind count
    python -m mukv.bench.preview OUT.png --stream-minutes 120 --questions 12
        # evidence of stream questions (with 2 frames of context each side)

Each row is one clip (or one question's evidence window); the questioned
scene's frames are outlined in green. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Sequence

import numpy as np


def _sheet(rows: list[tuple[np.ndarray, int, int, str]], path: str, scale: int = 3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(r[0]) for r in rows)
    S = rows[0][0].shape[1]
    cell = S * scale / 100.0  # inches at dpi=100
    fig = plt.figure(figsize=(cols * (cell + 0.08) + 0.2, len(rows) * (cell + 0.62) + 0.1), dpi=100)
    gs = fig.add_gridspec(len(rows), cols, hspace=0.9, wspace=0.06, left=0.01, right=0.99, top=0.96, bottom=0.01)
    for r, (frames, ev0, ev1, title) in enumerate(rows):
        for c in range(cols):
            ax = fig.add_subplot(gs[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(frames):
                ax.imshow(frames[c], interpolation="nearest")
                inside = ev0 <= c < ev1
                for sp in ax.spines.values():
                    sp.set_color("lime" if inside else "gray")
                    sp.set_linewidth(2.5 if inside else 0.5)
                ax.set_xlabel(str(c), fontsize=6, labelpad=1)
            else:
                ax.axis("off")
            if c == 0:
                ax.set_title(
                    "\n".join(textwrap.wrap(title, width=max(40, cols * 14))),
                    fontsize=7,
                    loc="left",
                    ha="left",
                )
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns a process exit code."""
    from .dataset import Benchmark, clip_at

    ap = argparse.ArgumentParser(prog="python -m mukv.bench.preview", description=__doc__.split("\n")[0])
    ap.add_argument("out", help="PNG path to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clips", type=int, default=6, help="number of clips (clip mode)")
    ap.add_argument("--frames", type=int, default=8, help="frames per clip (clip mode)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--kind", action="append", help="restrict to these kinds (repeatable)")
    ap.add_argument("--stream-minutes", type=float, default=None, help="preview a stream's questions instead")
    ap.add_argument("--questions", type=int, default=6, help="questions to show (stream mode)")
    ap.add_argument("--scale", type=int, default=3, help="pixels per frame pixel in the sheet")
    args = ap.parse_args(argv)

    rows = []
    if args.stream_minutes is None:
        for i in range(args.clips):
            clip = clip_at(args.seed, i, num_frames=args.frames, size=args.size, kinds=args.kind)
            title = f"[{clip.kind}/{clip.level}] {clip.question}  ->  {clip.answer}"
            rows.append((clip.frames, clip.evidence_start, clip.evidence_end, title))
    else:
        bench = Benchmark.generate(
            args.seed, args.stream_minutes, size=args.size, questions=args.questions, kinds=args.kind
        )
        st = bench.stream
        for q in bench.questions:
            a = max(0, q.evidence_start - 2)
            b = min(st.num_frames, q.evidence_end + 2)
            title = (
                f"[{q.id} {q.kind}/{q.level}, frames {q.evidence_start}-{q.evidence_end - 1}, "
                f"asked at {q.ask_frame} ({q.depth_s / 60:.1f} min later)] {q.text}  ->  {q.answer}"
            )
            rows.append((st.frames(a, b), q.evidence_start - a, q.evidence_end - a, title))
    _sheet(rows, args.out, scale=args.scale)
    print(f"wrote {args.out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
