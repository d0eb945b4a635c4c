"""Long procedural video streams with lazy, random-access rendering.

A stream is a sequence of *episodes* (scenes). Its layout, the *timeline*, is
a pair of small integer arrays (episode starts and lengths) computed from the
stream's :class:`StreamSpec` alone, in milliseconds even for a week of video.
The content of an episode is a pure function of ``(seed, episode index)`` (for
filler episodes) or ``(seed, needle index)`` (for questioned ones), so
``stream.frame(i)`` renders frame ``i`` directly, without touching any earlier
frame.

Layout
------
1. Filler episodes last between ``filler_s[0]`` and ``filler_s[1]`` seconds
   (log-uniform), i.e. a few frames to a few minutes. Their lengths are drawn in
   chunks of 4096 from ``default_rng([seed, 1, chunk])``.
2. ``questions`` needle episodes are then cut into the filler layout at their
   target frames (at least one filler frame between two needles): fillers they
   overlap are shortened, and a filler slot cut in two continues after the
   needle as a new episode, so no other episode moves. Each needle gets a depth (stream time
   between its last frame and the moment its question is asked), drawn
   log-uniformly between ``min_depth_s`` and the stream length and stratified
   so that all depths are covered.
3. Needle ``j`` uses key pair ``j`` of a seeded permutation of all key pairs;
   those pairs are forbidden in every other episode, which makes the wording of
   every question unique within the stream.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator, Mapping

import numpy as np

from ..errors import InputError
from .questions import Question, pose
from .render import render_into, render_state
from .scene import (
    KINDS,
    LEVELS,
    MAX_SCENE_LEN,
    Scene,
    blocked_matrix,
    key_pairs,
    make_scene,
)

# Sub-stream tags for np.random.default_rng([seed, TAG, ...]).
TAG_LENGTH = 1
TAG_FILLER = 2
TAG_NEEDLE = 3
TAG_PLAN = 4
TAG_RESERVE = 5
TAG_CLIP = 6
TAG_TAIL = 7

_CHUNK = 4096
#: Most questions one stream can carry (so that reserved key pairs stay under a third of all 840).
MAX_QUESTIONS = 240
#: Frames of one generated stream at most (231 days at 0.5 fps): its timeline is built in memory.
MAX_FRAMES = 10_000_000
_SPARE_KEYS = 32


@dataclass(frozen=True)
class StreamSpec:
    """Everything that defines a stream; the stream is a pure function of it.

    Attributes:
        seed: master seed (non-negative int).
        minutes: stream length in minutes of video time.
        fps: sampled frames per second (0.5 = one frame every 2 s).
        size: frame side in pixels (frames are ``size x size x 3``); 64 by
            default, 48 or more recommended.
        questions: number of needle episodes (one question each).
        kinds: question kinds to draw needles from, in balanced proportions.
        min_depth_s: shortest needle depth in seconds (scaled down for streams
            too short to honour it).
        filler_s: range of filler episode durations in seconds.
        version: layout version, bumped when generation changes.
    """

    seed: int
    minutes: float
    fps: float = 0.5
    size: int = 64
    questions: int = 0
    kinds: tuple[str, ...] = KINDS
    min_depth_s: float = 60.0
    filler_s: tuple[float, float] = (6.0, 180.0)
    version: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "filler_s", tuple(float(v) for v in self.filler_s))
        if self.seed < 0:
            raise InputError("seed must be non-negative")
        if not (math.isfinite(self.fps) and math.isfinite(self.minutes) and self.fps > 0 and self.minutes > 0):
            raise InputError("minutes and fps must be positive finite numbers")
        if self.minutes * 60.0 * self.fps > MAX_FRAMES:
            raise InputError(f"a generated stream holds at most {MAX_FRAMES:,} frames; {self.minutes:g} minutes at "
                             f"{self.fps:g} fps would be {self.minutes * 60.0 * self.fps:.3g} (use several seeds)")
        if self.size < 16:
            raise InputError("size must be at least 16 pixels")
        if not 0 <= self.questions <= MAX_QUESTIONS:
            raise InputError(f"questions must be in [0, {MAX_QUESTIONS}] per stream; use more seeds for more")
        bad = [k for k in self.kinds if k not in LEVELS]
        if bad or not self.kinds:
            raise InputError(f"unknown question kinds {bad}; expected a subset of {KINDS}")
        lo, hi = self.filler_s
        if not 0 < lo <= hi:
            raise InputError("filler_s must be (lo, hi) with 0 < lo <= hi")

    @property
    def num_frames(self) -> int:
        """Number of frames, ``round(minutes * 60 * fps)`` (at least 1)."""
        return max(1, int(round(self.minutes * 60.0 * self.fps)))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (tuples become lists)."""
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        d["filler_s"] = list(self.filler_s)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StreamSpec":
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("kinds", "filler_s"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)


@dataclass(frozen=True)
class Episode:
    """One episode of a stream.

    Attributes:
        index: episode index in the stream.
        start: first frame index.
        stop: one past the last frame index.
        needle: needle number (``>= 0``) if a question is about this episode,
            else -1.
    """

    index: int
    start: int
    stop: int
    needle: int = -1

    @property
    def length(self) -> int:
        """Number of frames."""
        return self.stop - self.start


class Stream:
    """A lazily rendered procedural video stream.

    Args:
        spec: the stream's definition.
        cache_size: how many episode scenes to keep in memory.

    Frames are uint8 ``[size, size, 3]`` RGB arrays; frame ``i`` is shown at
    ``i / fps`` seconds.
    """

    def __init__(self, spec: StreamSpec, cache_size: int = 2048):
        self.spec = spec
        self.size = int(spec.size)
        self.fps = float(spec.fps)
        self.num_frames = spec.num_frames
        self._cache: OrderedDict[int, Scene] = OrderedDict()
        self._cache_size = int(cache_size)
        self._build_timeline()

    # ------------------------------------------------------------------
    # Timeline
    # ------------------------------------------------------------------
    def _filler_lengths(self) -> np.ndarray:
        lo, hi = self.spec.filler_s
        chunks, total, c = [], 0, 0
        while total < self.num_frames:
            u = np.random.default_rng([self.spec.seed, TAG_LENGTH, c]).random(_CHUNK)
            secs = np.exp(math.log(lo) + u * math.log(hi / lo))
            lengths = np.maximum(2, np.round(secs * self.fps)).astype(np.int64)
            chunks.append(lengths)
            total += int(lengths.sum())
            c += 1
        lengths = np.concatenate(chunks)
        ends = np.cumsum(lengths)
        count = int(np.searchsorted(ends, self.num_frames, side="left")) + 1
        lengths = lengths[:count].copy()
        lengths[-1] -= int(ends[count - 1]) - self.num_frames
        return lengths

    def _build_timeline(self) -> None:
        spec = self.spec
        N = self.num_frames
        slot_len = self._filler_lengths()
        slot_start = np.concatenate([[0], np.cumsum(slot_len)[:-1]]).astype(np.int64)
        Q = int(spec.questions)
        self._blocked: np.ndarray | None = None
        self._needle_scenes: list[Scene] = []
        self._questions: list[Question] = []
        needle_start = np.zeros(0, dtype=np.int64)
        needle_len = np.zeros(0, dtype=np.int64)
        ask = np.zeros(0, dtype=np.int64)
        if Q > 0:
            # Reserve Q key pairs plus spares (a key pair can be impossible to
            # build some kinds around; the needle then takes the next spare).
            pairs = key_pairs()
            perm = np.random.default_rng([spec.seed, TAG_RESERVE]).permutation(len(pairs))
            pool = pairs[perm[: Q + _SPARE_KEYS]]
            self._blocked = blocked_matrix(pool)
            plan = np.random.default_rng([spec.seed, TAG_PLAN])
            kinds = [spec.kinds[i % len(spec.kinds)] for i in range(Q)]
            kinds = [kinds[i] for i in plan.permutation(Q)]
            scenes: list[Scene] = []
            p = 0
            for j in range(Q):
                rng = np.random.default_rng([spec.seed, TAG_NEEDLE, j])
                while True:
                    if p >= len(pool):  # pragma: no cover - never seen in practice
                        raise RuntimeError("ran out of spare key pairs while building needles")
                    key = (int(pool[p, 0]), int(pool[p, 1]))
                    p += 1
                    try:
                        scenes.append(make_scene(rng, kinds[j], key=key, blocked=self._blocked, attempts=40))
                        break
                    except RuntimeError:
                        continue
            self._needle_scenes = scenes
            needle_len = np.array([sc.n for sc in scenes], dtype=np.int64)

            # Depths in frames: log-uniform, stratified over the questions.
            room = N - 1 - MAX_SCENE_LEN
            if room < 2:
                raise InputError(f"stream of {N} frames is too short for questions")
            min_d = max(1, int(math.ceil(spec.min_depth_s * self.fps)))
            if min_d > room // 4:
                min_d = max(1, room // 8)
            max_d = max(min_d, room)
            u = (plan.permutation(Q) + plan.random(Q)) / Q
            depth = np.round(np.exp(math.log(min_d) + u * (math.log(max_d) - math.log(min_d)))).astype(np.int64)
            depth = np.clip(depth, min_d, max_d)
            # Target start frame of each needle, uniform over where it fits.
            latest = np.maximum(0, N - needle_len - depth - 1)
            target = np.floor(plan.random(Q) * (latest + 1)).astype(np.int64)

            # Place needles (most constrained first) on free frames, keeping
            # one free frame around each.
            occupied = np.zeros(N + 2, dtype=bool)  # index f + 1 <-> frame f
            needle_start = np.zeros(Q, dtype=np.int64)
            ask = np.zeros(Q, dtype=np.int64)
            for j in np.argsort(-depth, kind="stable").tolist():
                nj = int(needle_len[j])
                last_start = N - nj - min_d  # the ask frame must fit after the needle
                s0 = self._free_spot(occupied, int(target[j]), nj, last_start)
                if s0 < 0:
                    raise ValueError(
                        f"stream of {spec.minutes} min is too short for {Q} questions; "
                        "use fewer questions or a longer stream"
                    )
                occupied[s0 + 1 : s0 + nj + 1] = True
                needle_start[j] = s0
                ask[j] = min(N - 1, s0 + nj - 1 + int(depth[j]))

        # Episodes = filler slots with the needle intervals cut out.
        if Q == 0:
            starts, lengths = slot_start, slot_len
            needle_of = np.full(len(starts), -1, dtype=np.int64)
            content = np.arange(len(starts), dtype=np.int64)
        else:
            order = np.argsort(needle_start)
            ns, ne = needle_start[order], (needle_start + needle_len)[order]
            pos = np.searchsorted(ns, slot_start, side="right") - 1
            cover = pos >= 0
            swallowed = cover & (slot_start < ne[np.maximum(pos, 0)]) & (slot_start != ns[np.maximum(pos, 0)])
            cuts = np.unique(np.concatenate([slot_start[~swallowed], ns, ne, [N]]))
            starts = cuts[:-1]
            lengths = np.diff(cuts)
            # Needle owning each piece (pieces never straddle a needle boundary).
            pos = np.searchsorted(ns, starts, side="right") - 1
            owner = order[np.maximum(pos, 0)]
            inside = (pos >= 0) & (starts < ne[np.maximum(pos, 0)])
            needle_of = np.where(inside, owner, -1).astype(np.int64)
            # Fillers: a piece starting a slot shows that slot; a piece starting
            # where a needle ends (mid-slot) continues as a "tail" of that needle.
            slot_of = np.searchsorted(slot_start, starts, side="right") - 1
            at_slot = slot_start[slot_of] == starts
            content = np.where(at_slot, slot_of, -1 - np.where(pos >= 0, owner, 0)).astype(np.int64)
            content[needle_of >= 0] = 0
        self._content_id = content  # >= 0: filler slot id; < 0: tail of needle -1 - id

        if Q > 0:
            ep_of_needle = np.full(Q, -1, dtype=np.int64)
            ep_of_needle[needle_of[needle_of >= 0]] = np.flatnonzero(needle_of >= 0)
            records = []
            for j, scene in enumerate(scenes):
                k = int(ep_of_needle[j])
                text, answer = pose(scene)
                ev_start, ev_end = int(needle_start[j]), int(needle_start[j] + scene.n)
                records.append(
                    dict(
                        kind=scene.kind,
                        level=scene.level,
                        text=text,
                        answer=answer,
                        ask_frame=int(ask[j]),
                        evidence_start=ev_start,
                        evidence_end=ev_end,
                        depth_s=float((int(ask[j]) - (ev_end - 1)) / self.fps),
                        episode=k,
                    )
                )
            records.sort(key=lambda r: (r["ask_frame"], r["episode"]))
            self._questions = [Question(id=f"q{i:04d}", **r) for i, r in enumerate(records)]

        self._starts = starts.astype(np.int64)
        self._lengths = lengths.astype(np.int64)
        self._needle_of = needle_of
        for arr in (self._starts, self._lengths, self._needle_of, self._content_id):
            arr.setflags(write=False)

    @staticmethod
    def _free_spot(occupied: np.ndarray, target: int, n: int, last_start: int) -> int:
        """Start frame nearest to ``target`` where ``n`` frames plus a free frame
        on each side are unoccupied; -1 if none in ``[0, last_start]``."""
        if last_start < 0:
            return -1
        target = min(max(target, 0), last_start)

        def free(s: int) -> bool:
            # frames s-1 .. s+n  <->  occupied[s .. s+n+2)
            return not occupied[s : s + n + 2].any()

        for delta in range(last_start + 1):
            for s in (target + delta, target - delta) if delta else (target,):
                if 0 <= s <= last_start and free(s):
                    return s
        return -1

    # ------------------------------------------------------------------
    # Structure
    # ------------------------------------------------------------------
    @property
    def num_episodes(self) -> int:
        """Number of episodes."""
        return len(self._lengths)

    @property
    def episode_starts(self) -> np.ndarray:
        """int64 ``[num_episodes]`` first frame of each episode (read-only)."""
        return self._starts

    @property
    def episode_lengths(self) -> np.ndarray:
        """int64 ``[num_episodes]`` length in frames of each episode (read-only)."""
        return self._lengths

    def episodes(self) -> list[Episode]:
        """All episodes, in order."""
        return [
            Episode(int(k), int(s), int(s + n), int(j))
            for k, (s, n, j) in enumerate(zip(self._starts, self._lengths, self._needle_of))
        ]

    def episode(self, k: int) -> Episode:
        """Episode ``k``."""
        s, n = int(self._starts[k]), int(self._lengths[k])
        return Episode(int(k), s, s + n, int(self._needle_of[k]))

    def episode_index(self, frame: int) -> int:
        """Index of the episode containing frame ``frame``."""
        frame = self._check(frame)
        return int(np.searchsorted(self._starts, frame, side="right")) - 1

    def scene(self, k: int) -> Scene:
        """The symbolic :class:`Scene` of episode ``k`` (cached)."""
        k = int(k)
        sc = self._cache.get(k)
        if sc is not None:
            self._cache.move_to_end(k)
            return sc
        if not 0 <= k < self.num_episodes:
            raise IndexError(f"episode {k} out of range [0, {self.num_episodes})")
        j = int(self._needle_of[k])
        if j >= 0:
            sc = self._needle_scenes[j]
        else:
            cid = int(self._content_id[k])
            sub = [self.spec.seed, TAG_FILLER, cid] if cid >= 0 else [self.spec.seed, TAG_TAIL, -1 - cid]
            sc = make_scene(np.random.default_rng(sub), None, blocked=self._blocked)
        self._cache[k] = sc
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return sc

    def state(self, frame: int) -> list[dict]:
        """Symbolic content of frame ``frame`` (see :meth:`Scene.state`)."""
        k = self.episode_index(frame)
        return self.scene(k).state(int(frame) - int(self._starts[k]))

    def questions(self) -> list[Question]:
        """The stream's questions, sorted by ask frame (copies)."""
        return [Question(**asdict(q)) for q in self._questions]

    # ------------------------------------------------------------------
    # Time
    # ------------------------------------------------------------------
    @property
    def timestamps(self) -> np.ndarray:
        """float64 ``[num_frames]`` time of each frame in seconds."""
        return np.arange(self.num_frames, dtype=np.float64) / self.fps

    def timestamp(self, i: int) -> float:
        """Time of frame ``i`` in seconds."""
        return self._check(i) / self.fps

    @property
    def duration_s(self) -> float:
        """Stream duration in seconds."""
        return self.num_frames / self.fps

    # ------------------------------------------------------------------
    # Pixels
    # ------------------------------------------------------------------
    def _check(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.num_frames
        if not 0 <= i < self.num_frames:
            raise IndexError(f"frame {i} out of range [0, {self.num_frames})")
        return i

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` (negative counts from the end): uint8 ``[size, size, 3]``."""
        i = self._check(i)
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        out = np.empty((self.size, self.size, 3), dtype=np.uint8)
        return render_state(self.scene(k), i - int(self._starts[k]), out)

    def frames(self, start: int, stop: int) -> np.ndarray:
        """Frames ``[start, stop)``: uint8 ``[stop - start, size, size, 3]``."""
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.num_frames:
            raise IndexError(f"bad frame range [{start}, {stop}) for {self.num_frames} frames")
        out = np.empty((stop - start, self.size, self.size, 3), dtype=np.uint8)
        if stop == start:
            return out
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            s = int(self._starts[k])
            end = min(stop, s + int(self._lengths[k]))
            render_into(self.scene(k), out[pos - start : end - start], pos - s)
            pos = end
            k += 1
        return out

    def iter_frames(self, start: int = 0, stop: int | None = None, batch: int = 256) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first index, frames)`` batches covering ``[start, stop)``."""
        stop = self.num_frames if stop is None else int(stop)
        for a in range(int(start), stop, int(batch)):
            b = min(stop, a + int(batch))
            yield a, self.frames(a, b)

    def __len__(self) -> int:
        return self.num_frames

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(self.num_frames)
            if step != 1:
                raise ValueError("only step-1 slices are supported")
            return self.frames(start, max(start, stop))
        return self.frame(i)

    def __repr__(self) -> str:
        return (
            f"Stream(seed={self.spec.seed}, frames={self.num_frames}, episodes={self.num_episodes}, "
            f"questions={len(self._questions)}, size={self.size})"
        )


__all__ = ["StreamSpec", "Stream", "Episode", "MAX_QUESTIONS"]
