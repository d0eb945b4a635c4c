"""Benchmarks (a long stream plus questions) and short training clips.

:class:`Benchmark` ties a :class:`~mukv.bench.stream.StreamSpec` to the
questions asked about its stream, and stores both as one small JSON file:
frames are never stored, the stream re-renders bit-for-bit from its spec.

:func:`sample_clip` draws short, context-complete clips for training a small
Video-LLM: one questioned scene (all its evidence inside the clip) padded with
distractor scenes from the same generator that fills the long streams.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..errors import InputError, expect
from .questions import Question, pose
from .render import render_scene
from .scene import BACKGROUND_RGB, KINDS, LEVELS, MAX_SCENE_LEN, MIN_SCENE_LEN, Scene, blocked_matrix, make_scene
from .stream import TAG_CLIP, Stream, StreamSpec

#: Identifies the JSON layout written by :meth:`Benchmark.save`.
FORMAT = "mukv.bench"
FORMAT_VERSION = 1


class Benchmark:
    """A procedurally generated long stream and the questions asked about it.

    Args:
        spec: the stream definition (its ``questions`` field says how many
            needle episodes the stream carries).
        questions: the questions; by default those the spec generates.

    The :attr:`stream` is created lazily (cheap: milliseconds even for a week).
    """

    def __init__(self, spec: StreamSpec, questions: Sequence[Question] | None = None):
        expect(spec, StreamSpec, "Benchmark: spec")
        if questions is not None:
            if isinstance(questions, (str, bytes)) or not isinstance(questions, Iterable):
                raise InputError("Benchmark: questions must be a sequence of Question records (or None)")
            questions = list(questions)  # once: a generator is read here
            if not all(isinstance(q, Question) for q in questions):
                raise InputError("Benchmark: questions must be a sequence of Question records (or None)")
        self.spec = spec
        self._stream: Stream | None = None
        self.questions: list[Question] = questions if questions is not None else self.stream.questions()

    @classmethod
    def generate(
        cls,
        seed: int,
        minutes: float,
        fps: float = 0.5,
        size: int = 64,
        questions: int = 100,
        kinds: Sequence[str] | None = None,
        min_depth_s: float = 60.0,
        **spec_kwargs: Any,
    ) -> "Benchmark":
        """Build a stream of ``minutes`` of video with ``questions`` questions.

        Questions are spread over kinds in equal shares (``kinds`` defaults to
        all of :data:`~mukv.bench.scene.KINDS`) and over depths, log-uniformly
        from ``min_depth_s`` to the stream length. Extra keyword arguments go
        to :class:`StreamSpec` (e.g. ``filler_s``).
        """
        spec = StreamSpec(
            seed=int(seed),
            minutes=float(minutes),
            fps=float(fps),
            size=int(size),
            questions=int(questions),
            kinds=tuple(kinds) if kinds is not None else KINDS,
            min_depth_s=float(min_depth_s),
            **spec_kwargs,
        )
        return cls(spec)

    @property
    def stream(self) -> Stream:
        """The benchmark's :class:`Stream` (created on first use)."""
        if self._stream is None:
            self._stream = Stream(self.spec)
        return self._stream

    # ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form: format tag, spec, frame count and questions."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "spec": self.spec.to_dict(),
            "num_frames": self.spec.num_frames,
            "questions": [q.to_dict() for q in self.questions],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Benchmark":
        """Inverse of :meth:`to_dict`."""
        if d.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file (format={d.get('format')!r})")
        if int(d.get("version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{FORMAT} version {d['version']} is newer than this code ({FORMAT_VERSION})")
        spec = StreamSpec.from_dict(d["spec"])
        return cls(spec, [Question.from_dict(q) for q in d["questions"]])

    def save(self, path: str | Path) -> Path:
        """Write the benchmark as JSON to ``path``; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Benchmark":
        """Read a benchmark written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def verify(self) -> None:
        """Check that the stored questions are the ones the spec generates.

        Raises:
            ValueError: on the first mismatch (e.g. the file was edited, or
                generation changed since it was written).
        """
        fresh = {q.id: q for q in self.stream.questions()}
        if len(fresh) != len(self.questions):
            raise ValueError(f"{len(self.questions)} questions stored, spec generates {len(fresh)}")
        for q in self.questions:
            g = fresh.get(q.id)
            if g is None or g.to_dict() != q.to_dict():
                raise ValueError(f"question {q.id} differs from the regenerated one: {q} != {g}")

    def evidence(self, q: Question) -> np.ndarray:
        """The evidence frames of question ``q``: uint8 ``[n, S, S, 3]``."""
        return self.stream.frames(q.evidence_start, q.evidence_end)

    def __len__(self) -> int:
        return len(self.questions)

    def __repr__(self) -> str:
        s = self.spec
        return f"Benchmark(seed={s.seed}, minutes={s.minutes}, fps={s.fps}, frames={s.num_frames}, questions={len(self.questions)})"


# --------------------------------------------------------------------------
# Training clips
# --------------------------------------------------------------------------


@dataclass
class Clip:
    """A short, context-complete training example.

    Attributes:
        frames: uint8 ``[n, S, S, 3]``.
        question: question text (words from the vocabulary).
        answer: single-word answer.
        kind: question kind.
        level: ``"patch"``, ``"frame"`` or ``"segment"``.
        evidence_start, evidence_end: frames of the questioned scene within
            the clip (end exclusive).
        scene: the questioned scene's symbolic description (for training
            signals that need its objects, e.g. ``mukv.train.evidence_mask``).
    """

    frames: np.ndarray
    question: str
    answer: str
    kind: str
    level: str
    evidence_start: int
    evidence_end: int
    scene: Scene | None = field(default=None, repr=False, compare=False)


def sample_clip(
    rng: np.random.Generator | int | None = None,
    num_frames: int | None = 8,
    *,
    size: int = 64,
    kinds: Sequence[str] | None = None,
    distractors: bool = True,
) -> Clip:
    """Draw one training clip.

    Args:
        rng: a Generator, or a seed for one.
        num_frames: clip length (>= 4). The questioned scene (2 to
            ``min(8, num_frames)`` frames) is placed at a random offset; the
            frames before and after it show other scenes. None: the clip is
            exactly the questioned scene.
        size: frame side in pixels.
        kinds: question kinds to draw from (uniformly); default all.
        distractors: pad with distractor scenes (True) or with empty
            background frames (False).

    Returns:
        A :class:`Clip`; every frame the answer depends on is inside it, and
        the padding never shows the questioned scene's key pair.
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    kinds = tuple(kinds) if kinds is not None else KINDS
    bad = [k for k in kinds if k not in LEVELS]
    if bad:
        raise ValueError(f"unknown question kinds {bad}")
    if num_frames is not None and num_frames < MIN_SCENE_LEN:
        raise ValueError(f"num_frames must be >= {MIN_SCENE_LEN}")
    kind = kinds[int(rng.integers(len(kinds)))]
    max_len = MAX_SCENE_LEN if num_frames is None else min(MAX_SCENE_LEN, int(num_frames))
    scene = make_scene(rng, kind, max_len=max_len)
    question, answer = pose(scene)
    body = render_scene(scene, size)
    if num_frames is None:
        return Clip(body, question, answer, kind, scene.level, 0, scene.n, scene)
    pad = int(num_frames) - scene.n
    before = int(rng.integers(0, pad + 1))
    after = pad - before
    frames = np.empty((int(num_frames), size, size, 3), dtype=np.uint8)
    frames[before : before + scene.n] = body
    if distractors:
        blocked = blocked_matrix([scene.key])
        if before:
            pre = make_scene(rng, None, blocked=blocked)
            # The end of a previous scene, as a stream would show it.
            frames[:before] = render_scene(pre, size, length=before, start=max(0, pre.n - before))
        if after:
            post = make_scene(rng, None, blocked=blocked)
            frames[before + scene.n :] = render_scene(post, size, length=after)
    else:
        bg = BACKGROUND_RGB[int(rng.integers(len(BACKGROUND_RGB)))]
        frames[:before] = bg
        frames[before + scene.n :] = bg
    return Clip(frames, question, answer, kind, scene.level, before, before + scene.n, scene)


def clip_at(seed: int, index: int, **kwargs: Any) -> Clip:
    """Clip number ``index`` of the deterministic clip sequence of ``seed``."""
    return sample_clip(np.random.default_rng([int(seed), TAG_CLIP, int(index)]), **kwargs)


def iter_clips(seed: int, n: int, **kwargs: Any) -> Iterator[Clip]:
    """Yield ``n`` clips, deterministic in ``seed`` (kwargs: see :func:`sample_clip`)."""
    for i in range(int(n)):
        yield clip_at(seed, i, **kwargs)


class ClipDataset:
    """Map-style dataset of clips (works with ``torch.utils.data.DataLoader``).

    Item ``i`` is :func:`clip_at(seed, i, **kwargs) <clip_at>`, so any worker
    can produce any item and epochs are reproducible.
    """

    def __init__(self, seed: int, length: int, **kwargs: Any):
        for name, value in (("seed", seed), ("length", length)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise InputError(f"ClipDataset: {name} must be a non-negative integer; got {value!r}"[:200])
        self.seed = int(seed)
        self.length = int(length)
        self.kwargs = kwargs

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Clip:
        if not -self.length <= i < self.length:
            raise IndexError(i)
        return clip_at(self.seed, i % self.length, **self.kwargs)
