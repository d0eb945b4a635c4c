"""Questions, their closed vocabulary, and scoring.

Every question names its scene by the scene's two key objects and asks one
thing about it, e.g.

    "In the scene with the red circle and the blue square, which way did the
    triangle move?"  ->  "right"

Answers are single words from a closed set per kind (:func:`answer_space`).
Predictions are scored by exact match after :func:`normalize` (lower case,
punctuation dropped, first word kept, digits 1-4 spelled out).

:data:`VOCABULARY` lists every token that any question or answer can contain,
with punctuation as separate tokens, in the same split that :func:`tokenize`
(and a whitespace + punctuation pre-tokenizer) produces.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping

from ..errors import InputError, expect
from .scene import (
    COLORS,
    CORNERS,
    DIRECTIONS,
    EVENTS,
    KINDS,
    LEVELS,
    NUMBERS,
    SHAPES,
    SIDES,
    Scene,
    _runs,
    split_identity,
)

# --------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------

#: Opening that names the scene; filled with two "<colour> <shape>" phrases.
SCENE_PHRASE = "In the scene with the {a} and the {b}, "

#: Body of each question kind. Placeholders: {corner}, {host}, {shape}, {color}.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "mark_color": ("what color was the small mark in the {corner} corner?",),
    "mark_exists": ("was there a small mark in the {corner} corner?",),
    "dot_color": ("what color was the dot on the {host}?",),
    "object_color": ("what color was the {shape}?",),
    "object_shape": ("what shape was the {color} object?",),
    "object_place": ("on which side was the {shape}?",),
    "motion": ("which way did the {shape} move?",),
    "count": ("how many times did the {shape} appear?",),
    "color_change": (
        "what color was the {shape} before it changed?",
        "what color did the {shape} change to?",
    ),
    "event": ("what happened to the {shape}?",),
    "after": ("what shape appeared right after the {shape} vanished?",),
}

_ANSWERS: dict[str, tuple[str, ...]] = {
    "mark_color": COLORS,
    "mark_exists": ("yes", "no"),
    "dot_color": COLORS,
    "object_color": COLORS,
    "object_shape": SHAPES,
    "object_place": SIDES,
    "motion": DIRECTIONS,
    "count": NUMBERS,
    "color_change": COLORS,
    "event": EVENTS,
    "after": SHAPES,
}


def answer_space(kind: str) -> list[str]:
    """All answers a question of ``kind`` can have (closed set, single words)."""
    expect(kind, str, "answer_space: the question kind")
    if kind not in _ANSWERS:
        raise InputError(f"answer_space: unknown question kind {kind!r}; kinds: {', '.join(sorted(_ANSWERS))}")
    return list(_ANSWERS[kind])


_TOKEN_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lower-case word-level split; every punctuation character is its own token."""
    expect(text, str, "tokenize: the text")
    return _TOKEN_RE.findall(text.lower())


def _build_vocabulary() -> list[str]:
    words: set[str] = set()
    words.update(tokenize(SCENE_PHRASE.format(a="", b="")))
    for bodies in TEMPLATES.values():
        for body in bodies:
            words.update(tokenize(re.sub(r"\{\w+\}", " ", body)))
    for group in (COLORS, SHAPES, CORNERS, DIRECTIONS, SIDES, EVENTS, NUMBERS, ("yes", "no")):
        for w in group:
            words.update(tokenize(w))
    return sorted(words)


#: Sorted list of every token that can appear in a question or an answer.
VOCABULARY: list[str] = _build_vocabulary()


# --------------------------------------------------------------------------
# Question records
# --------------------------------------------------------------------------


@dataclass
class Question:
    """One benchmark question about a long stream.

    Attributes:
        id: stable identifier within the benchmark (``"q0000"`` ...).
        kind: question kind (one of :data:`KINDS`).
        level: evidence granularity, ``"patch"``, ``"frame"`` or ``"segment"``.
        text: the question, words from :data:`VOCABULARY` only.
        answer: the single-word answer.
        ask_frame: the question is asked once this frame index has been fed.
        evidence_start: first frame of the evidence (the questioned scene).
        evidence_end: one past the last evidence frame (exclusive).
        depth_s: seconds of stream between the last evidence frame and the
            ask frame (the needle's depth).
        episode: index of the questioned episode in the stream.
    """

    id: str
    kind: str
    level: str
    text: str
    answer: str
    ask_frame: int
    evidence_start: int
    evidence_end: int
    depth_s: float = 0.0
    episode: int = -1

    @property
    def depth_frames(self) -> int:
        """Frames between the last evidence frame and the ask frame."""
        return int(self.ask_frame - (self.evidence_end - 1))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Question":
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def pose(scene: Scene) -> tuple[str, str]:
    """The question text and answer of a scene, derived from its symbolic state.

    Returns:
        ``(text, answer)``; the answer is computed from the scene's per-frame
        state, never stored separately.
    """
    expect(scene, Scene, "pose: the scene")
    kind = scene.kind
    q = scene.query
    a = _name(scene.key[0])
    b = _name(scene.key[1])
    head = SCENE_PHRASE.format(a=a, b=b)
    subj = scene.objects[q["subject"]] if "subject" in q else None
    shape = SHAPES[subj.shape] if subj is not None else ""

    if kind == "mark_color":
        body = TEMPLATES[kind][0].format(corner=CORNERS[q["corner"]])
        answer = COLORS[dict(scene.marks)[q["corner"]]]
    elif kind == "mark_exists":
        body = TEMPLATES[kind][0].format(corner=CORNERS[q["corner"]])
        answer = "yes" if q["corner"] in dict(scene.marks) else "no"
    elif kind == "dot_color":
        host = scene.objects[q["host"]]
        body = TEMPLATES[kind][0].format(host=_name(scene.key[q["host"]]))
        answer = COLORS[host.dot]
    elif kind == "object_color":
        body = TEMPLATES[kind][0].format(shape=shape)
        answer = COLORS[int(subj.color[0])]
    elif kind == "object_shape":
        body = TEMPLATES[kind][0].format(color=COLORS[int(subj.color[0])])
        answer = shape
    elif kind == "object_place":
        body = TEMPLATES[kind][0].format(shape=shape)
        dx, dy = float(subj.x[0]) - 32.0, float(subj.y[0]) - 32.0
        answer = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("bottom" if dy > 0 else "top")
    elif kind == "motion":
        body = TEMPLATES[kind][0].format(shape=shape)
        dx, dy = float(subj.x[-1] - subj.x[0]), float(subj.y[-1] - subj.y[0])
        answer = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    elif kind == "count":
        body = TEMPLATES[kind][0].format(shape=shape)
        answer = NUMBERS[_runs(subj.visible) - 1]
    elif kind == "color_change":
        before = q.get("variant", "before") == "before"
        body = TEMPLATES[kind][0 if before else 1].format(shape=shape)
        answer = COLORS[int(subj.color[0] if before else subj.color[-1])]
    elif kind == "event":
        body = TEMPLATES[kind][0].format(shape=shape)
        if not subj.visible[0]:
            answer = "appeared"
        elif not subj.visible[-1]:
            answer = "vanished"
        elif subj.size[-1] > subj.size[0]:
            answer = "grew"
        else:
            answer = "shrank"
    elif kind == "after":
        body = TEMPLATES[kind][0].format(shape=shape)
        answer = SHAPES[scene.objects[q["next"]].shape]
    else:  # pragma: no cover
        raise ValueError(kind)
    return head + body, answer


def _name(ident: int) -> str:
    c, s = split_identity(ident)
    return f"{COLORS[c]} {SHAPES[s]}"


# --------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------

_DIGITS = {"1": "one", "2": "two", "3": "three", "4": "four", "0": "zero"}


def normalize(text: str) -> str:
    """Canonical form of a short answer: first word, lower case, no punctuation.

    Digits are spelled out ("3" -> "three") so numeric predictions match the
    vocabulary's number words. ``None`` and empty strings give ``""``.
    """
    if text is None:
        return ""
    words = re.sub(r"[^\w\s]|_", " ", str(text).lower()).split()
    if not words:
        return ""
    return _DIGITS.get(words[0], words[0])


def score(prediction: str, answer: str) -> bool:
    """True when the normalised prediction equals the normalised answer."""
    return normalize(prediction) == normalize(answer) and normalize(answer) != ""


#: Depth buckets (seconds) used by :func:`accuracy_report`.
DEPTH_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("<10min", 0.0, 600.0),
    ("10min-1h", 600.0, 3600.0),
    ("1h-6h", 3600.0, 6 * 3600.0),
    ("6h-1d", 6 * 3600.0, 24 * 3600.0),
    (">1d", 24 * 3600.0, math.inf),
)


def _depth_bucket(depth_s: float) -> str:
    for name, lo, hi in DEPTH_BUCKETS:
        if lo <= depth_s < hi:
            return name
    return DEPTH_BUCKETS[-1][0]


def accuracy_report(results: Iterable[Any]) -> dict[str, Any]:
    """Accuracy overall, per kind, per level and per needle depth.

    Args:
        results: items of either form
            - ``(question, prediction)`` with ``question`` a :class:`Question`;
            - a mapping with ``kind`` and either ``correct`` (bool) or both
              ``answer`` and ``prediction``; optional ``level`` (derived from
              the kind when missing) and ``depth_s``.

    Returns:
        ``{"overall": float, "n": int, "correct": int, "by_kind": {...},
        "by_level": {...}, "by_depth": {...}}`` where each group maps a name to
        ``{"accuracy": float, "n": int, "correct": int}``. Empty groups are
        left out; accuracy of an empty report is ``nan``.
    """
    if isinstance(results, (str, bytes)) or not isinstance(results, Iterable):
        raise InputError(f"accuracy_report takes an iterable of results; got {type(results).__name__}")
    groups: dict[str, dict[str, list[int]]] = {"by_kind": {}, "by_level": {}, "by_depth": {}}
    total = [0, 0]
    for item in results:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Question):
            q, pred = item
            kind, level, depth, ok = q.kind, q.level, q.depth_s, score(pred, q.answer)
        elif isinstance(item, Mapping):
            kind = item["kind"]
            level = item.get("level") or LEVELS.get(kind, "unknown")
            depth = item.get("depth_s")
            ok = bool(item["correct"]) if "correct" in item else score(item["prediction"], item["answer"])
        else:
            raise TypeError(f"cannot read a result from {type(item).__name__}")
        total[0] += int(ok)
        total[1] += 1
        for group, name in (("by_kind", kind), ("by_level", level)):
            cell = groups[group].setdefault(name, [0, 0])
            cell[0] += int(ok)
            cell[1] += 1
        if depth is not None:
            cell = groups["by_depth"].setdefault(_depth_bucket(float(depth)), [0, 0])
            cell[0] += int(ok)
            cell[1] += 1

    def acc(c: int, n: int) -> float:
        return c / n if n else float("nan")

    order = {
        "by_kind": list(KINDS),
        "by_level": ["patch", "frame", "segment"],
        "by_depth": [b[0] for b in DEPTH_BUCKETS],
    }
    report: dict[str, Any] = {"overall": acc(*total), "n": total[1], "correct": total[0]}
    for group, cells in groups.items():
        names = [k for k in order[group] if k in cells] + sorted(k for k in cells if k not in order[group])
        report[group] = {k: {"accuracy": acc(*cells[k]), "n": cells[k][1], "correct": cells[k][0]} for k in names}
    return report
