"""Rasterise symbolic scenes into uint8 RGB frames with plain numpy.

Shapes are drawn from cached boolean templates (one per shape and pixel size),
so drawing an object is one masked assignment into a small window of the
frame. No anti-aliasing: every pixel is exactly a palette colour or the
background tint, which keeps the frames easy to parse (see
:mod:`mukv.bench.oracle`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..errors import expect
from .scene import (
    BACKGROUND_RGB,
    CANONICAL,
    COLOR_RGB,
    DOT_SIZE,
    MARK_OFFSET,
    MARK_SIZE,
    SHAPES,
    Scene,
)


@lru_cache(maxsize=None)
def shape_template(shape: int, px: int) -> np.ndarray:
    """Boolean mask ``[px, px]`` of shape id ``shape`` filling its box.

    Every template touches all four sides of its box, so an object's pixel
    bounding box equals its drawn box. The returned array is read-only.
    """
    name = SHAPES[shape]
    c = (np.arange(px) + 0.5) - px / 2.0
    dy, dx = np.meshgrid(c, c, indexing="ij")
    r = px / 2.0
    if name == "square":
        m = np.ones((px, px), dtype=bool)
    elif name == "circle":
        m = dx * dx + dy * dy <= r * r
    elif name == "ring":
        inner = r - max(2.0, px * 0.26)
        d2 = dx * dx + dy * dy
        m = (d2 <= r * r) & (d2 > inner * inner)
    elif name == "diamond":
        m = np.abs(dx) + np.abs(dy) <= r
    elif name == "cross":
        w = max(1.0, round(px / 3.0)) / 2.0
        m = (np.abs(dx) <= w) | (np.abs(dy) <= w)
    elif name == "triangle":
        # Apex up; row i spans a width proportional to (i + 1).
        rows = np.arange(px)[:, None]
        half = (rows + 1) / px * r
        m = np.abs(dx) <= half
    else:  # pragma: no cover
        raise ValueError(name)
    m = np.ascontiguousarray(m)
    m.setflags(write=False)
    return m


def object_box(x: float, y: float, size: float, frame_size: int) -> tuple[int, int, int]:
    """Pixel box ``(x0, y0, px)`` of an object with canonical centre and size."""
    s = frame_size / CANONICAL
    px = max(3, int(round(size * s)))
    x0 = int(round(x * s - px / 2.0))
    y0 = int(round(y * s - px / 2.0))
    return x0, y0, px


def dot_box(shape: int, x0: int, y0: int, px: int, frame_size: int) -> tuple[int, int, int]:
    """Pixel box ``(dx0, dy0, dpx)`` of the dot drawn on an object's box.

    The dot sits at the box centre, lowered for triangles so that it lies on
    the wide part of the shape.
    """
    s = frame_size / CANONICAL
    dpx = max(2, int(round(DOT_SIZE * s)))
    cy = y0 + px / 2.0 + (px / 6.0 if SHAPES[shape] == "triangle" else 0.0)
    cx = x0 + px / 2.0
    return int(round(cx - dpx / 2.0)), int(round(cy - dpx / 2.0)), dpx


def mark_box(corner: int, frame_size: int) -> tuple[int, int, int]:
    """Pixel box ``(x0, y0, px)`` of the corner mark of corner id ``corner``."""
    s = frame_size / CANONICAL
    px = max(2, int(round(MARK_SIZE * s)))
    off = int(round(MARK_OFFSET * s))
    x0 = off if corner in (0, 2) else frame_size - off - px
    y0 = off if corner in (0, 1) else frame_size - off - px
    return x0, y0, px


def _paint(out: np.ndarray, x0: int, y0: int, mask: np.ndarray, rgb: np.ndarray) -> None:
    h, w = mask.shape
    H, W = out.shape[:2]
    ya, yb = max(y0, 0), min(y0 + h, H)
    xa, xb = max(x0, 0), min(x0 + w, W)
    if ya >= yb or xa >= xb:
        return
    sub = mask[ya - y0 : yb - y0, xa - x0 : xb - x0]
    out[ya:yb, xa:xb][sub] = rgb


_FULL: dict[int, np.ndarray] = {}


def _full(px: int) -> np.ndarray:
    m = _FULL.get(px)
    if m is None:
        m = _FULL[px] = np.ones((px, px), dtype=bool)
    return m


def render_state(scene: Scene, t: int, out: np.ndarray) -> np.ndarray:
    """Draw local frame ``t`` of ``scene`` into ``out`` (uint8 ``[S, S, 3]``).

    ``t`` past the scene's natural length shows the last frame. Returns ``out``.
    """
    expect(scene, Scene, "render_state: the scene")
    expect(out, np.ndarray, "render_state: out")
    size = out.shape[0]
    t = min(max(int(t), 0), scene.n - 1)
    out[...] = BACKGROUND_RGB[scene.background]
    for corner, color in scene.marks:
        x0, y0, px = mark_box(corner, size)
        out[y0 : y0 + px, x0 : x0 + px] = COLOR_RGB[color]
    for o in scene.objects:
        if not o.visible[t]:
            continue
        x0, y0, px = object_box(o.x[t], o.y[t], o.size[t], size)
        _paint(out, x0, y0, shape_template(o.shape, px), COLOR_RGB[o.color[t]])
        if o.dot >= 0:
            dx0, dy0, dpx = dot_box(o.shape, x0, y0, px, size)
            _paint(out, dx0, dy0, _full(dpx), COLOR_RGB[o.dot])
    return out


def render_scene(scene: Scene, size: int = 64, length: int | None = None, start: int = 0) -> np.ndarray:
    """Render frames ``[start, start + length)`` of a scene.

    Args:
        scene: the scene.
        size: frame side in pixels.
        length: number of frames (default: the scene's natural length).
        start: first local frame index.

    Returns:
        uint8 ``[length, size, size, 3]``. Frames past the natural length
        repeat the last state (rendered once, then copied).
    """
    expect(scene, Scene, "render_scene: the scene")
    if length is None:
        length = scene.n - start
    out = np.empty((length, size, size, 3), dtype=np.uint8)
    render_into(scene, out, start)
    return out


def render_into(scene: Scene, out: np.ndarray, start: int = 0) -> None:
    """Fill ``out`` (uint8 ``[k, S, S, 3]``) with local frames ``start .. start+k``."""
    k = out.shape[0]
    last = scene.n - 1
    # Frames up to the last distinct state are drawn; the rest are copies.
    drawn = max(0, min(k, last - start + 1))
    for j in range(drawn):
        render_state(scene, start + j, out[j])
    if drawn < k:
        if drawn == 0:
            render_state(scene, last, out[0])
            drawn = 1
        out[drawn:] = out[drawn - 1]
