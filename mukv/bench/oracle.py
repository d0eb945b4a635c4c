"""A pixel-level oracle: read frames back into symbols and answer questions.

:func:`perceive` parses one rendered frame (exact palette colours, connected
components, template matching) into objects, dots and corner marks.
:func:`solve` answers a question from a sequence of frames only: it finds the
frames where both key objects named by the question are visible, checks that
they form one contiguous run, and reasons over that run.

The oracle serves two purposes: tests use it to prove that every question is
answerable from its evidence frames (and that the scene it names is unique
within the frames given), and evaluations can use it as an upper bound for a
memory method: feed it the frames a retriever returned, in time order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import expect
from .questions import SCENE_PHRASE, TEMPLATES
from .render import mark_box, shape_template
from .scene import (
    CANONICAL,
    COLOR_RGB,
    COLORS,
    CORNERS,
    DOT_SIZE,
    NUMBERS,
    SHAPES,
)


@dataclass
class SeenObject:
    """An object found in a frame.

    Attributes:
        color, shape: palette colour id and shape id.
        x, y: centre in canonical units (pixels of a 64 x 64 frame).
        size: box side in canonical units.
        dot: colour id of the dot on it, or -1.
        misfit: pixels that disagree with the best shape template (0 = exact).
    """

    color: int
    shape: int
    x: float
    y: float
    size: float
    dot: int = -1
    misfit: int = 0


@dataclass
class Percept:
    """Everything :func:`perceive` reads from one frame."""

    objects: list[SeenObject] = field(default_factory=list)
    marks: dict[int, int] = field(default_factory=dict)

    def find(self, color: int | None = None, shape: int | None = None) -> list[SeenObject]:
        """Objects matching the given colour and/or shape."""
        return [
            o
            for o in self.objects
            if (color is None or o.color == color) and (shape is None or o.shape == shape)
        ]


_CODES = (COLOR_RGB[:, 0].astype(np.int64) << 16) | (COLOR_RGB[:, 1].astype(np.int64) << 8) | COLOR_RGB[:, 2]
_ORDER = np.argsort(_CODES)
_SORTED = _CODES[_ORDER]


def color_map(frame: np.ndarray) -> np.ndarray:
    """int64 ``[S, S]`` palette colour id per pixel, -1 for non-palette pixels."""
    f = frame.astype(np.int64)
    code = (f[..., 0] << 16) | (f[..., 1] << 8) | f[..., 2]
    pos = np.clip(np.searchsorted(_SORTED, code), 0, len(_SORTED) - 1)
    return np.where(_SORTED[pos] == code, _ORDER[pos], -1)


def label_components(cmap: np.ndarray) -> np.ndarray:
    """4-connected components of equal, non-negative values.

    Returns int64 ``[S, S]`` labels (the smallest flat index in each
    component), -1 where ``cmap < 0``.
    """
    H, W = cmap.shape
    big = H * W
    lab = np.where(cmap >= 0, np.arange(big).reshape(H, W), big)
    same_v = (cmap[1:, :] == cmap[:-1, :]) & (cmap[1:, :] >= 0)
    same_h = (cmap[:, 1:] == cmap[:, :-1]) & (cmap[:, 1:] >= 0)
    while True:
        new = lab.copy()
        np.minimum(new[1:, :], np.where(same_v, lab[:-1, :], big), out=new[1:, :])
        np.minimum(new[:-1, :], np.where(same_v, lab[1:, :], big), out=new[:-1, :])
        np.minimum(new[:, 1:], np.where(same_h, lab[:, :-1], big), out=new[:, 1:])
        np.minimum(new[:, :-1], np.where(same_h, lab[:, 1:], big), out=new[:, :-1])
        # Pointer jumping: a pixel adopts the label of the pixel its label names.
        flat = new.reshape(-1)
        valid = flat < big
        flat[valid] = np.minimum(flat[valid], flat[flat[valid]])
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(cmap >= 0, lab, -1)


def perceive(frame: np.ndarray) -> Percept:
    """Parse one rendered frame (uint8 ``[S, S, 3]``) into a :class:`Percept`."""
    expect(frame, np.ndarray, "perceive: the frame")
    S = frame.shape[0]
    scale = S / CANONICAL
    cmap = color_map(frame)
    out = Percept()
    for corner in range(len(CORNERS)):
        x0, y0, px = mark_box(corner, S)
        box = cmap[y0 : y0 + px, x0 : x0 + px]
        vals = np.unique(box)
        if len(vals) == 1 and vals[0] >= 0:
            out.marks[corner] = int(vals[0])
        cmap[y0 : y0 + px, x0 : x0 + px] = -1
    labels = label_components(cmap)
    ids = np.unique(labels[labels >= 0])
    dpx = max(2, int(round(DOT_SIZE * scale)))
    comps = []
    for lab in ids.tolist():
        ys, xs = np.nonzero(labels == lab)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        color = int(cmap[ys[0], xs[0]])
        comps.append((color, y0, y1, x0, x1, len(ys), lab))
    dots = [c for c in comps if c[2] - c[1] <= dpx and c[4] - c[3] <= dpx and c[5] == (c[2] - c[1]) * (c[4] - c[3])]
    objs = [c for c in comps if c not in dots]
    for color, y0, y1, x0, x1, _, lab in objs:
        px = max(y1 - y0, x1 - x0)
        mask = labels[y0 : y0 + px, x0 : x0 + px] == lab
        if mask.shape != (px, px):  # clipped at the frame border
            mask = np.pad(mask, ((0, px - mask.shape[0]), (0, px - mask.shape[1])))
        valid = np.ones((px, px), dtype=bool)
        dot = -1
        for dcolor, dy0, dy1, dx0, dx1, _, _ in dots:
            cy, cx = (dy0 + dy1) / 2.0, (dx0 + dx1) / 2.0
            if y0 <= cy < y0 + px and x0 <= cx < x0 + px:
                dot = dcolor
                valid[max(dy0 - y0, 0) : dy1 - y0, max(dx0 - x0, 0) : dx1 - x0] = False
        misfits = [int(np.count_nonzero((shape_template(s, px) != mask) & valid)) for s in range(len(SHAPES))]
        shape = int(np.argmin(misfits))
        out.objects.append(
            SeenObject(
                color=color,
                shape=shape,
                x=(x0 + px / 2.0) / scale,
                y=(y0 + px / 2.0) / scale,
                size=px / scale,
                dot=dot,
                misfit=misfits[shape],
            )
        )
    return out


# --------------------------------------------------------------------------
# Question parsing
# --------------------------------------------------------------------------

_WORD = r"([a-z]+)"
_FILL = {
    "corner": "(" + "|".join(CORNERS) + ")",
    "host": r"([a-z]+ [a-z]+)",
    "shape": _WORD,
    "color": _WORD,
}


def _pattern(body: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", body)
    rx = "".join(_FILL[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile("^" + rx + "$")


_HEAD = re.compile(
    "^" + re.escape(SCENE_PHRASE.split("{a}")[0].lower()) + r"([a-z]+) ([a-z]+) and the ([a-z]+) ([a-z]+), (.*)$"
)
_BODIES = [(kind, i, _pattern(body)) for kind, bodies in TEMPLATES.items() for i, body in enumerate(bodies)]


def parse(question: str) -> dict | None:
    """Split a question into its key objects, kind and arguments.

    Returns ``{"key": ((color, shape), (color, shape)), "kind": str,
    "variant": int, "args": tuple[str, ...]}`` or None if it matches no template.
    """
    expect(question, str, "parse: the question")
    m = _HEAD.match(question.strip().lower())
    if not m:
        return None
    ca, sa, cb, sb, body = m.groups()
    try:
        key = ((COLORS.index(ca), SHAPES.index(sa)), (COLORS.index(cb), SHAPES.index(sb)))
    except ValueError:
        return None
    for kind, variant, rx in _BODIES:
        mb = rx.match(body)
        if mb:
            return {"key": key, "kind": kind, "variant": variant, "args": mb.groups()}
    return None


def _one(values) -> int | None:
    vals = set(values)
    return vals.pop() if len(vals) == 1 else None


def solve(question: str, frames: np.ndarray | list) -> str | None:
    """Answer ``question`` from ``frames`` (uint8 ``[n, S, S, 3]``, time order).

    Returns the answer word, or None when the frames do not determine it: the
    named scene is absent, appears in more than one separate run, or the
    asked-about thing is missing or ambiguous.
    """
    expect(question, str, "solve: the question")
    expect(frames, (np.ndarray, list), "solve: the frames")
    parsed = parse(question)
    if parsed is None:
        return None
    percepts = [perceive(f) for f in frames]
    (ca, sa), (cb, sb) = parsed["key"]
    in_scene = [bool(p.find(ca, sa)) and bool(p.find(cb, sb)) for p in percepts]
    idx = np.flatnonzero(in_scene)
    if len(idx) == 0 or idx[-1] - idx[0] + 1 != len(idx):
        return None
    scene = [percepts[i] for i in idx]
    kind, args = parsed["kind"], parsed["args"]

    if kind in ("mark_color", "mark_exists"):
        corner = CORNERS.index(args[0])
        seen = [p.marks.get(corner) for p in scene]
        if kind == "mark_exists":
            return "yes" if any(v is not None for v in seen) else "no"
        c = _one(v for v in seen if v is not None)
        return None if c is None else COLORS[c]
    if kind == "dot_color":
        hc, hs = args[0].split()
        dots = [o.dot for p in scene for o in p.find(COLORS.index(hc), SHAPES.index(hs))]
        c = _one(d for d in dots if d >= 0)
        return None if c is None else COLORS[c]
    if kind == "object_shape":
        if args[0] not in COLORS:
            return None
        s = _one(o.shape for p in scene for o in p.find(color=COLORS.index(args[0])))
        return None if s is None else SHAPES[s]

    if args[0] not in SHAPES:
        return None
    shape = SHAPES.index(args[0])
    track = [p.find(shape=shape) for p in scene]
    if any(len(t) > 1 for t in track):
        return None
    vis = np.array([len(t) == 1 for t in track])
    seen = [t[0] for t in track if t]
    if kind == "count":
        runs = int(np.count_nonzero(vis[1:] & ~vis[:-1]) + int(vis[0]))
        return NUMBERS[runs - 1] if 1 <= runs <= len(NUMBERS) else None
    if kind == "after":
        gone = [i for i in range(1, len(vis)) if vis[i - 1] and not vis[i]]
        if len(gone) != 1:
            return None
        t = gone[0]
        before = {(o.color, o.shape) for o in scene[t - 1].objects}
        new = [o for o in scene[t].objects if (o.color, o.shape) not in before]
        return SHAPES[new[0].shape] if len(new) == 1 else None
    if not seen:
        return None
    if kind == "object_color":
        c = _one(o.color for o in seen)
        return None if c is None else COLORS[c]
    if kind == "object_place":
        dx, dy = seen[0].x - CANONICAL / 2, seen[0].y - CANONICAL / 2
        return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("bottom" if dy > 0 else "top")
    if kind == "motion":
        dx, dy = seen[-1].x - seen[0].x, seen[-1].y - seen[0].y
        if dx == dy == 0:
            return None
        return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    if kind == "color_change":
        colors = [o.color for o in seen]
        if len(set(colors)) != 2:
            return None
        return COLORS[colors[0] if parsed["variant"] == 0 else colors[-1]]
    if kind == "event":
        if not vis[0] and vis[-1]:
            return "appeared"
        if vis[0] and not vis[-1]:
            return "vanished"
        if seen[-1].size > seen[0].size:
            return "grew"
        if seen[-1].size < seen[0].size:
            return "shrank"
        return None
    return None  # pragma: no cover


__all__ = ["Percept", "SeenObject", "perceive", "parse", "solve", "color_map", "label_components"]
