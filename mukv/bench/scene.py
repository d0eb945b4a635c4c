"""Symbolic scenes: the world model behind every frame of the benchmark.

A *scene* is a short piece of video (a handful of frames) with a background
tint, a few coloured shapes ("objects"), optional small square *marks* in the
frame corners and optional small *dots* on objects. Every scene is built around
one question *kind* (see :data:`KINDS`): its objects behave so that the kind's
question has exactly one answer, readable from the scene's frames alone.

Identity and uniqueness
-----------------------
An object's identity is its (colour, shape) pair; there are
``len(COLORS) * len(SHAPES) = 48`` identities. Every scene has two *key*
objects, of different colour and different shape, present and still in every
frame of the scene. Questions name the scene by its key pair ("in the scene
with the red circle and the blue square"). A long stream reserves some key
pairs for its questioned scenes ("needles"); every other scene of the stream is
built with a ``blocked`` matrix that forbids any two of its objects from forming
a reserved pair, so a needle's key pair co-occurs nowhere else in the stream.

Coordinates
-----------
Positions and sizes are in *canonical units*: pixels of a 64 x 64 frame. The
renderer scales them to the requested frame size. Objects sit on a 3 x 3 grid
of cells centred at 15, 32 and 49 (or move along a row/column of it), corner
marks live in the 4 x 4 boxes one pixel in from the frame corners, and nothing
else ever enters those boxes. All gaps (object to object, object to mark) are
at least 2 canonical pixels, so rendering at 48 pixels or more never lets two
things overlap.

Everything here is pure Python + numpy and deterministic given a
``numpy.random.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import expect

# --------------------------------------------------------------------------
# Palette and vocabulary of the world
# --------------------------------------------------------------------------

#: Object / mark / dot colour names, index = colour id.
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")

#: RGB value of every colour in :data:`COLORS`, uint8 ``[8, 3]``.
COLOR_RGB: np.ndarray = np.array(
    [
        (225, 35, 35),  # red
        (255, 145, 0),  # orange
        (245, 225, 40),  # yellow
        (40, 195, 65),  # green
        (40, 215, 230),  # cyan
        (45, 85, 240),  # blue
        (160, 70, 215),  # purple
        (245, 245, 245),  # white
    ],
    dtype=np.uint8,
)

#: Object shape names, index = shape id.
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "diamond", "cross", "ring")

#: Dark background tints (not nameable colours), uint8 ``[4, 3]``.
BACKGROUND_RGB: np.ndarray = np.array(
    [(28, 28, 30), (44, 36, 32), (26, 36, 48), (32, 44, 34)], dtype=np.uint8
)

#: Corner names, index = corner id (marks live in these corners).
CORNERS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")

#: Question kinds and the granularity level their evidence needs.
LEVELS: dict[str, str] = {
    "mark_color": "patch",
    "mark_exists": "patch",
    "dot_color": "patch",
    "object_color": "frame",
    "object_shape": "frame",
    "object_place": "frame",
    "motion": "segment",
    "count": "segment",
    "color_change": "segment",
    "event": "segment",
    "after": "segment",
}

#: All question kinds, in a fixed order.
KINDS: tuple[str, ...] = tuple(LEVELS)

#: Directions of motion (answer words of the ``motion`` kind).
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
#: Sides of the frame (answer words of the ``object_place`` kind).
SIDES: tuple[str, ...] = ("left", "right", "top", "bottom")
#: Events (answer words of the ``event`` kind).
EVENTS: tuple[str, ...] = ("grew", "shrank", "appeared", "vanished")
#: Count words (answer words of the ``count`` kind); index + 1 = count.
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four")

N_COLORS = len(COLORS)
N_SHAPES = len(SHAPES)
N_IDENTITIES = N_COLORS * N_SHAPES

# Canonical geometry (units: pixels of a 64 x 64 frame).
CANONICAL = 64
CELL_CENTERS: tuple[float, ...] = (15.0, 32.0, 49.0)
SIZE_SMALL, SIZE_NORMAL, SIZE_LARGE = 9.0, 13.0, 15.0
MARK_OFFSET, MARK_SIZE = 1.0, 4.0
DOT_SIZE = 4.0
#: Longest natural length (frames) of any scene built with the default ``max_len``.
MAX_SCENE_LEN = 8
#: Shortest ``max_len`` that every kind can be built with.
MIN_SCENE_LEN = 4

#: Edge-centre cells of the grid and the side they name: (row, col) -> side.
_SIDE_CELLS = {"top": (0, 1), "bottom": (2, 1), "left": (1, 0), "right": (1, 2)}


def identity(color: int, shape: int) -> int:
    """Identity id of a (colour id, shape id) pair, in ``[0, 48)``."""
    return int(color) * N_SHAPES + int(shape)


def split_identity(ident: int) -> tuple[int, int]:
    """Inverse of :func:`identity`: ``(colour id, shape id)``."""
    return int(ident) // N_SHAPES, int(ident) % N_SHAPES


def identity_name(ident: int) -> str:
    """Human words for an identity, e.g. ``"red circle"``."""
    c, s = split_identity(ident)
    return f"{COLORS[c]} {SHAPES[s]}"


def key_pairs() -> np.ndarray:
    """Every possible key pair, int64 ``[840, 2]`` with ``a < b``.

    A key pair is two identities of different colour *and* different shape.
    The order is fixed (lexicographic), so a permutation of it seeded from a
    stream seed is reproducible.
    """
    idx = np.arange(N_IDENTITIES)
    a, b = np.meshgrid(idx, idx, indexing="ij")
    ok = (a < b) & (a // N_SHAPES != b // N_SHAPES) & (a % N_SHAPES != b % N_SHAPES)
    return np.stack([a[ok], b[ok]], axis=1).astype(np.int64)


def blocked_matrix(pairs: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """Symmetric bool ``[48, 48]`` matrix, True where a pair may not co-occur."""
    m = np.zeros((N_IDENTITIES, N_IDENTITIES), dtype=bool)
    p = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    m[p[:, 0], p[:, 1]] = True
    m[p[:, 1], p[:, 0]] = True
    return m


# --------------------------------------------------------------------------
# Scene data structures
# --------------------------------------------------------------------------


@dataclass
class SceneObject:
    """One coloured shape and its per-frame state over a scene of ``n`` frames.

    Attributes:
        shape: shape id (index into :data:`SHAPES`); constant over the scene.
        color: int64 ``[n]`` colour id per frame.
        x, y: float64 ``[n]`` centre, canonical units.
        size: float64 ``[n]`` side of the bounding box, canonical units.
        visible: bool ``[n]``.
        dot: colour id of a small dot drawn on the object, or -1 for none.
        role: ``"key"``, ``"subject"``, ``"distractor"``, ``"next"`` (the object
            that appears right after the subject vanishes in ``after`` scenes)
            or ``"other"``.
    """

    shape: int
    color: np.ndarray
    x: np.ndarray
    y: np.ndarray
    size: np.ndarray
    visible: np.ndarray
    dot: int = -1
    role: str = "other"

    def identities(self) -> set[int]:
        """Identities this object takes at any visible frame."""
        return {identity(c, self.shape) for c in np.unique(self.color[self.visible])}


@dataclass
class Scene:
    """A short scene: a few objects, corner marks, and the question it supports.

    Attributes:
        kind: question kind the scene was built for (one of :data:`KINDS`).
        n: natural length in frames; frames past ``n - 1`` repeat the last one.
        background: background tint id (index into :data:`BACKGROUND_RGB`).
        objects: drawn in order (later ones on top; they never overlap).
        marks: ``(corner id, colour id)`` pairs, constant over the scene.
        key: the two key identities ``(a, b)``, in the order the question names them.
        query: kind-specific parameters of the question (``subject`` = index
            into ``objects``, ``corner``, ``host``, ``variant``).
    """

    kind: str
    n: int
    background: int
    objects: list[SceneObject]
    marks: tuple[tuple[int, int], ...]
    key: tuple[int, int]
    query: dict = field(default_factory=dict)

    @property
    def level(self) -> str:
        """Granularity level of the scene's question."""
        return LEVELS[self.kind]

    def identities(self) -> set[int]:
        """All object identities appearing anywhere in the scene."""
        out: set[int] = set()
        for o in self.objects:
            out |= o.identities()
        return out

    def state(self, t: int) -> list[dict]:
        """Visible objects at local frame ``t`` (clamped to ``[0, n)``).

        Returns a list of dicts with ``color``, ``shape``, ``x``, ``y``,
        ``size`` (canonical units), ``dot`` and ``role``.
        """
        t = min(max(int(t), 0), self.n - 1)
        out = []
        for o in self.objects:
            if o.visible[t]:
                out.append(
                    dict(
                        color=int(o.color[t]),
                        shape=int(o.shape),
                        x=float(o.x[t]),
                        y=float(o.y[t]),
                        size=float(o.size[t]),
                        dot=int(o.dot),
                        role=o.role,
                    )
                )
        return out


# --------------------------------------------------------------------------
# Scene construction
# --------------------------------------------------------------------------


class _Retry(Exception):
    """Internal: the random draw painted itself into a corner; draw again."""


class _Builder:
    """Keeps the colour/shape/identity bookkeeping while a scene is drawn."""

    def __init__(self, rng: np.random.Generator, n: int, blocked: np.ndarray | None, key_pair: tuple[int, int] | None):
        self.rng = rng
        self.n = n
        self.blocked = blocked
        self.key_pair = frozenset(key_pair) if key_pair is not None else None
        self.idents: list[int] = []
        self.colors: set[int] = set()
        self.shapes: set[int] = set()
        self.free_cells: list[tuple[int, int]] = [(r, c) for r in range(3) for c in range(3)]
        self.objects: list[SceneObject] = []

    # identity bookkeeping -------------------------------------------------
    def compatible(self, ident: int) -> bool:
        c, s = split_identity(ident)
        if c in self.colors or s in self.shapes:
            return False
        return self.pair_ok(ident)

    def pair_ok(self, ident: int) -> bool:
        if self.blocked is None:
            return True
        for other in self.idents:
            if self.key_pair is not None and frozenset((ident, other)) == self.key_pair:
                continue
            if self.blocked[ident, other]:
                return False
        return True

    def claim(self, ident: int) -> None:
        c, s = split_identity(ident)
        self.idents.append(ident)
        self.colors.add(c)
        self.shapes.add(s)

    def pick_identity(self) -> int:
        cands = [i for i in range(N_IDENTITIES) if self.compatible(i)]
        if not cands:
            raise _Retry
        ident = int(cands[self.rng.integers(len(cands))])
        self.claim(ident)
        return ident

    def pick_second_color(self, shape: int) -> int:
        """A new colour for an object of ``shape`` (a colour change)."""
        cands = [
            c for c in range(N_COLORS) if c not in self.colors and self.pair_ok(identity(c, shape))
        ]
        if not cands:
            raise _Retry
        c = int(cands[self.rng.integers(len(cands))])
        self.idents.append(identity(c, shape))
        self.colors.add(c)
        return c

    # cells ------------------------------------------------------------------
    def take_cell(self, allowed=None) -> tuple[int, int]:
        cells = [c for c in self.free_cells if allowed is None or allowed(c)]
        if not cells:
            raise _Retry
        cell = cells[self.rng.integers(len(cells))]
        self.free_cells.remove(cell)
        return cell

    def reserve_cells(self, pred) -> None:
        self.free_cells = [c for c in self.free_cells if not pred(c)]

    # objects --------------------------------------------------------------
    def add(self, ident: int, cell=None, *, role="other", size=SIZE_NORMAL, visible=None) -> SceneObject:
        c, s = split_identity(ident)
        n = self.n
        if cell is None:
            cell = self.take_cell()
        r, col = cell
        obj = SceneObject(
            shape=s,
            color=np.full(n, c, dtype=np.int64),
            x=np.full(n, CELL_CENTERS[col], dtype=np.float64),
            y=np.full(n, CELL_CENTERS[r], dtype=np.float64),
            size=np.full(n, float(size), dtype=np.float64),
            visible=np.ones(n, dtype=bool) if visible is None else np.asarray(visible, dtype=bool),
            role=role,
        )
        self.objects.append(obj)
        return obj


def _blink_pattern(rng: np.random.Generator, k: int, n_max: int) -> np.ndarray:
    """Visibility pattern with exactly ``k`` runs of "on" frames, length <= ``n_max``.

    Runs are one frame long, gaps between them one or two frames, with optional
    "off" frames before the first and after the last run. The pattern is at
    least 3 frames long.
    """
    for _ in range(20):
        lead = int(rng.integers(0, 2))
        trail = int(rng.integers(0, 2))
        gaps = rng.integers(1, 3, size=max(k - 1, 0))
        if k == 1:
            lead, trail = 1, 1
        seq = [False] * lead
        for i in range(k):
            seq.append(True)
            if i < k - 1:
                seq.extend([False] * int(gaps[i]))
        seq.extend([False] * trail)
        if len(seq) <= n_max:
            return np.array(seq, dtype=bool)
    # Fall back to the tightest pattern.
    seq = []
    for i in range(k):
        seq.append(True)
        if i < k - 1:
            seq.append(False)
    if k == 1:
        seq = [False, True, False]
    return np.array(seq, dtype=bool)


def _runs(v: np.ndarray) -> int:
    """Number of runs of True in a bool vector."""
    v = np.asarray(v, dtype=bool)
    return int(np.count_nonzero(v[1:] & ~v[:-1]) + int(v[0])) if len(v) else 0


def make_scene(
    rng: np.random.Generator,
    kind: str | None = None,
    *,
    key: tuple[int, int] | None = None,
    blocked: np.ndarray | None = None,
    max_len: int = MAX_SCENE_LEN,
    attempts: int = 100,
) -> Scene:
    """Draw a random scene for question ``kind``.

    Args:
        rng: source of randomness; the scene is a pure function of its state.
        kind: one of :data:`KINDS`; None draws one uniformly.
        key: the two key identities (different colours and shapes); None draws
            a pair not forbidden by ``blocked``.
        blocked: bool ``[48, 48]``; no two objects of the scene may form a
            True pair, except the key pair itself. None forbids nothing.
        max_len: upper bound on the scene's natural length (>= 4).
        attempts: how many random layouts to try before giving up.

    Returns:
        A :class:`Scene` whose ``n`` is between 2 and ``max_len`` frames.

    Raises:
        RuntimeError: no layout satisfied the constraints (possible when a
            fixed ``key`` meets a dense ``blocked`` matrix).
    """
    expect(rng, np.random.Generator, "make_scene: rng")
    if max_len < MIN_SCENE_LEN:
        raise ValueError(f"max_len must be >= {MIN_SCENE_LEN}, got {max_len}")
    if kind is None:
        kind = KINDS[int(rng.integers(len(KINDS)))]
    if kind not in LEVELS:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")
    for _ in range(attempts):
        try:
            return _build(rng, kind, key, blocked, max_len)
        except _Retry:
            continue
    raise RuntimeError(f"could not build a {kind!r} scene with key {key}")


def _draw_key(rng: np.random.Generator, blocked: np.ndarray | None) -> tuple[int, int]:
    for _ in range(100):
        a = int(rng.integers(N_IDENTITIES))
        ca, sa = split_identity(a)
        cands = [
            b
            for b in range(N_IDENTITIES)
            if b // N_SHAPES != ca and b % N_SHAPES != sa and (blocked is None or not blocked[a, b])
        ]
        if cands:
            return a, int(cands[rng.integers(len(cands))])
    raise RuntimeError("no free key pair left")


def _build(rng, kind, key, blocked, max_len) -> Scene:
    if key is None:
        key = _draw_key(rng, blocked)
    key = (int(key[0]), int(key[1]))
    ca, sa = split_identity(key[0])
    cb, sb = split_identity(key[1])
    if ca == cb or sa == sb:
        raise ValueError(f"key objects must differ in colour and shape: {key}")

    # Natural length per kind.
    if kind in ("mark_color", "mark_exists", "dot_color", "object_color", "object_shape", "object_place"):
        n = int(rng.integers(2, 5))
    elif kind in ("motion", "color_change", "event"):
        n = int(rng.integers(3, 6))
    elif kind == "after":
        n = int(rng.integers(4, min(6, max_len) + 1))
    elif kind == "count":
        k = int(rng.integers(1, 5))
        k = min(k, (max_len + 1) // 2)
        pattern = _blink_pattern(rng, k, max_len)
        n = len(pattern)
    else:  # pragma: no cover - guarded by make_scene
        raise ValueError(kind)
    n = min(n, max_len)

    b = _Builder(rng, n, blocked, key)
    b.claim(key[0])
    b.claim(key[1])
    query: dict = {}
    marks: list[tuple[int, int]] = []

    def random_marks(lo: int, hi: int) -> list[tuple[int, int]]:
        count = int(rng.integers(lo, hi + 1))
        corners = rng.permutation(4)[:count]
        return [(int(c), int(rng.integers(N_COLORS))) for c in corners]

    key_cells: list = [None, None]
    subject: SceneObject | None = None

    if kind == "motion":
        direction = DIRECTIONS[int(rng.integers(4))]
        horizontal = direction in ("left", "right")
        lanes = [int(v) for v in rng.permutation(3)]
        lane_c, lane_d = lanes[0], lanes[1]
        with_d = bool(rng.random() < 0.6)
        lane_of = (lambda cell: cell[0]) if horizontal else (lambda cell: cell[1])
        b.reserve_cells(lambda cell: lane_of(cell) == lane_c or (with_d and lane_of(cell) == lane_d))
        key_cells = [b.take_cell(), b.take_cell()]
        b.add(key[0], key_cells[0], role="key")
        b.add(key[1], key_cells[1], role="key")

        def path(forward: bool, lane: int):
            lo, hi = 12.0 + rng.uniform(0, 6), 52.0 - rng.uniform(0, 6)
            pos = np.linspace(lo, hi, n) if forward else np.linspace(hi, lo, n)
            fixed = np.full(n, CELL_CENTERS[lane])
            return (pos, fixed) if horizontal else (fixed, pos)

        forward = direction in ("right", "down")
        subject = b.add(b.pick_identity(), (0, 0), role="subject")
        subject.x, subject.y = path(forward, lane_c)
        if with_d:
            d = b.add(b.pick_identity(), (0, 0), role="distractor")
            # The distractor moves the other way in a parallel lane, or sits still.
            if rng.random() < 0.7:
                d.x, d.y = path(not forward, lane_d)
            else:
                col = float(CELL_CENTERS[int(rng.integers(3))])
                d.x, d.y = (np.full(n, col), np.full(n, CELL_CENTERS[lane_d])) if horizontal else (
                    np.full(n, CELL_CENTERS[lane_d]),
                    np.full(n, col),
                )
        query["subject"] = b.objects.index(subject)
        marks = random_marks(0, 2)
    else:
        if kind == "object_place":
            side = SIDES[int(rng.integers(4))]
            subject_cell = _SIDE_CELLS[side]
            b.free_cells.remove(subject_cell)
        key_cells = [b.take_cell(), b.take_cell()]
        b.add(key[0], key_cells[0], role="key")
        b.add(key[1], key_cells[1], role="key")

        if kind in ("mark_color", "mark_exists", "dot_color"):
            for _ in range(int(rng.integers(0, 3))):
                b.add(b.pick_identity(), role="other")
            if kind == "mark_color":
                marks = random_marks(1, 2)
                if len(marks) == 2 and marks[0][1] == marks[1][1]:
                    marks[1] = (marks[1][0], int((marks[1][1] + 1 + rng.integers(N_COLORS - 1)) % N_COLORS))
                query["corner"] = marks[int(rng.integers(len(marks)))][0]
            elif kind == "mark_exists":
                yes = bool(rng.random() < 0.5)
                marks = random_marks(1 if yes else 0, 2 if yes else 3)
                marked = [c for c, _ in marks]
                if yes:
                    query["corner"] = marked[int(rng.integers(len(marked)))]
                else:
                    free = [c for c in range(4) if c not in marked]
                    query["corner"] = free[int(rng.integers(len(free)))]
            else:
                marks = random_marks(0, 2)
                host = int(rng.integers(2))
                query["host"] = host
        elif kind in ("object_color", "object_shape", "object_place", "color_change", "event", "count"):
            cell = subject_cell if kind == "object_place" else None
            size = SIZE_NORMAL
            subject = b.add(b.pick_identity(), cell, role="subject", size=size)
            query["subject"] = len(b.objects) - 1
            if kind == "color_change":
                t = int(rng.integers(1, n))
                c2 = b.pick_second_color(subject.shape)
                subject.color[t:] = c2
                query["variant"] = "before" if rng.random() < 0.5 else "after"
            elif kind == "event":
                event = EVENTS[int(rng.integers(4))]
                t = int(rng.integers(1, n))
                if event == "grew":
                    subject.size[:t], subject.size[t:] = SIZE_SMALL, SIZE_LARGE
                elif event == "shrank":
                    subject.size[:t], subject.size[t:] = SIZE_LARGE, SIZE_SMALL
                elif event == "appeared":
                    subject.visible[:t] = False
                else:
                    subject.visible[t:] = False
            elif kind == "count":
                subject.visible[:] = pattern
            if rng.random() < 0.6:
                d = b.add(b.pick_identity(), role="distractor")
                if kind == "count" and rng.random() < 0.7:
                    # A distractor that blinks a different number of times.
                    for _ in range(10):
                        vis = rng.random(n) < 0.5
                        if vis.any() and _runs(vis) != _runs(pattern):
                            d.visible[:] = vis
                            break
                elif kind == "event" and rng.random() < 0.7:
                    other = [e for e in EVENTS if e != event]
                    ev_d = other[int(rng.integers(len(other)))]
                    t_d = int(rng.integers(1, n))
                    if ev_d == "grew":
                        d.size[:t_d], d.size[t_d:] = SIZE_SMALL, SIZE_LARGE
                    elif ev_d == "shrank":
                        d.size[:t_d], d.size[t_d:] = SIZE_LARGE, SIZE_SMALL
                    elif ev_d == "appeared":
                        d.visible[:t_d] = False
                    else:
                        d.visible[t_d:] = False
                elif kind == "color_change" and rng.random() < 0.3:
                    t_d = int(rng.integers(1, n))
                    d.color[t_d:] = b.pick_second_color(d.shape)
            marks = random_marks(0, 2)
        elif kind == "after":
            t = int(rng.integers(1, n - 1))
            subject = b.add(b.pick_identity(), role="subject")
            subject.visible[t:] = False
            nxt = b.add(b.pick_identity(), role="next")
            nxt.visible[:t] = False
            late = b.add(b.pick_identity(), role="distractor")
            if t >= 2 and rng.random() < 0.5:
                t_f = int(rng.integers(1, t))
            else:
                t_f = int(rng.integers(t + 1, n))
            late.visible[:t_f] = False
            query["subject"] = b.objects.index(subject)
            query["next"] = b.objects.index(nxt)
            marks = random_marks(0, 2)
        else:  # pragma: no cover
            raise ValueError(kind)

    # Dots: only ever on the two key objects (they stay still and keep their size).
    keys = b.objects[:2]
    for i, o in enumerate(keys):
        want = kind == "dot_color" and query.get("host") == i
        if want or rng.random() < (0.5 if kind == "dot_color" else 0.25):
            cands = [c for c in range(N_COLORS) if c != int(o.color[0])]
            if kind == "dot_color" and i != query.get("host") and keys[query["host"]].dot >= 0:
                cands = [c for c in cands if c != keys[query["host"]].dot]
            o.dot = int(cands[rng.integers(len(cands))])
    # Name the key objects in random order.
    if rng.random() < 0.5:
        key = (key[1], key[0])
        if "host" in query:
            query["host"] = 1 - query["host"]
        b.objects[0], b.objects[1] = b.objects[1], b.objects[0]
        for name in ("subject", "next"):
            if name in query and query[name] < 2:  # pragma: no cover - subjects are never keys
                query[name] = 1 - query[name]
    return Scene(
        kind=kind,
        n=n,
        background=int(rng.integers(len(BACKGROUND_RGB))),
        objects=b.objects,
        marks=tuple(sorted(marks)),
        key=key,
        query=query,
    )
