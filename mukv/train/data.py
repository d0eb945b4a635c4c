"""Training data of mukv-tiny: clips of :mod:`mukv.bench` scenes with one or more
questions each, their training-only targets (per-token perception labels, evidence
masks, query targets), the held-out evaluation clips and the batch loader."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch


@dataclass
class TrainingClip:
    """A clip with one or more questions about scenes inside it.

    Attributes:
        frames: uint8 ``[n, S, S, 3]``.
        questions: ``(text, answer, kind)`` per questioned scene.
        labels: optional int64 ``[n, 3, g, g]`` per-token perception targets
            (see :func:`token_labels`).
        sources: ``(scene, first frame in the clip, evidence spec or None)`` of every question.
        evidence: optional bool ``[len(questions), n, g, g]`` (see :func:`evidence_mask`).
        query_labels: optional int64 ``[len(questions), 3]`` (see :func:`query_targets`).
        spans: int64 ``[len(questions), 2]``: first frame and one past the last frame of
            each question's scene in the clip (the positives of the retrieval loss).
    """

    frames: np.ndarray
    questions: list[tuple[str, str, str]]
    labels: np.ndarray | None = None
    sources: list[tuple[Any, int, dict | None]] = field(default_factory=list, repr=False)
    evidence: np.ndarray | None = None
    query_labels: np.ndarray | None = None
    spans: np.ndarray | None = None


#: Classes of :func:`query_targets`: shape (6), colour (8), corner (4).
QUERY_CLASSES: tuple[int, int, int] = (6, 8, 4)

#: Classes of the auxiliary per-token targets: colour (8 + none), shape (6 + mark + none), dot colour (8 + none).
AUX_CLASSES: tuple[int, int, int] = (9, 8, 9)


def token_labels(frames: np.ndarray, grid: int) -> np.ndarray:
    """Auxiliary perception targets for every visual token of every frame: int64
    ``[n, 3, grid, grid]`` = (colour of the object or corner mark under the
    token's centre, its shape (6 = mark, 7 = nothing), colour of the dot on that
    object). Read from the pixels by :func:`mukv.bench.perceive` (the benchmark's
    pixel oracle), so they apply to any rendered clip."""
    from mukv.bench import perceive
    from mukv.bench.render import mark_box
    from mukv.bench.scene import CANONICAL

    n, size = frames.shape[0], frames.shape[1]
    out = np.empty((n, 3, grid, grid), dtype=np.int64)
    centres = (np.arange(grid) + 0.5) * CANONICAL / grid  # canonical units
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    scale = size / CANONICAL
    for i in range(n):
        p = perceive(frames[i])
        color = np.full((grid, grid), 8)
        shape = np.full((grid, grid), 7)
        dot = np.full((grid, grid), 8)
        for o in p.objects:
            h = o.size / 2.0
            inside = (np.abs(cx - o.x) <= h) & (np.abs(cy - o.y) <= h)
            color[inside], shape[inside] = o.color, o.shape
            if o.dot >= 0:
                dot[inside] = o.dot
        for corner, c in p.marks.items():
            x0, y0, px = mark_box(corner, size)
            inside = ((cx * scale >= x0 - 1) & (cx * scale <= x0 + px + 1) & (cy * scale >= y0 - 1)
                      & (cy * scale <= y0 + px + 1))
            color[inside], shape[inside] = c, 6
        out[i, 0], out[i, 1], out[i, 2] = color, shape, dot
    return out


def evidence_mask(scene, offset: int, num_frames: int, grid: int, spec: dict | None = None) -> np.ndarray:
    """The visual tokens a question about ``scene`` is answered from: bool
    ``[num_frames, grid, grid]``, True on the tokens over the objects the question
    is about (its subject; the dot's host; for "after" also the shape that
    appeared; for corner marks the corner's mark box) in the scene's frames where
    they are visible. ``offset`` is the scene's first frame in the clip.
    ``spec`` overrides what the question is about (``{"objects": [i, ...]}`` or
    ``{"corner": c}``; :func:`extra_questions` makes them); default: the scene's own
    question (``scene.query``).

    Training only: the target of the attention supervision (``TrainConfig.attn_sup``)
    that teaches a small model where to look; inference never sees it."""
    from mukv.bench.render import mark_box
    from mukv.bench.scene import CANONICAL

    out = np.zeros((num_frames, grid, grid), dtype=bool)
    cell = CANONICAL / grid
    centres = (np.arange(grid) + 0.5) * cell
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    q = scene.query
    frames = range(max(0, offset), min(num_frames, offset + scene.n))
    corner = spec.get("corner") if spec else (q["corner"] if scene.kind in ("mark_color", "mark_exists") else None)
    if corner is not None:
        x0, y0, px = mark_box(corner, CANONICAL)
        box = ((cx >= x0 - cell / 2) & (cx <= x0 + px + cell / 2) & (cy >= y0 - cell / 2)
               & (cy <= y0 + px + cell / 2))
        for t in frames:
            out[t] = box
        return out
    if spec:
        objects = [scene.objects[i] for i in spec["objects"]]
    elif scene.kind == "dot_color":
        objects = [scene.objects[q["host"]]]
    else:
        objects = [scene.objects[q["subject"]]]
        if scene.kind == "after":
            objects.append(scene.objects[q["next"]])
    for t in frames:
        i = t - offset
        for o in objects:
            if not bool(o.visible[i]):
                continue
            h = float(o.size[i]) / 2 + cell / 2
            out[t] |= (np.abs(cx - float(o.x[i])) <= h) & (np.abs(cy - float(o.y[i])) <= h)
    return out


def extra_questions(scene, rng: np.random.Generator, limit: int) -> list[tuple[str, str, str, dict]]:
    """Up to ``limit`` more questions about one scene, of the kinds that any scene
    answers from its static facts (its corner marks, the dots on its key objects,
    the colour / shape / side of an object that the question names uniquely):
    ``(text, answer, kind, evidence spec)`` in the benchmark's own templates.

    Training only: a clip's visual tokens are encoded once and every question about
    them is a cheap extra forward of the answer prompt, so asking several per scene
    multiplies the answer signal per encoded frame. Only unambiguous questions are
    made: a named shape or colour occurs on exactly one object of the scene, that
    object keeps its colour, place and visibility over the scene, and an asked
    side is clear by two canonical units."""
    from mukv.bench.questions import SCENE_PHRASE, TEMPLATES, _name
    from mukv.bench.scene import COLORS, CORNERS, SHAPES

    head = SCENE_PHRASE.format(a=_name(scene.key[0]), b=_name(scene.key[1]))
    objs = scene.objects
    shapes = [o.shape for o in objs]
    colors = [c for o in objs for c in np.unique(o.color)]
    out: list[tuple[str, str, str, dict]] = []
    marks = dict(scene.marks)
    for corner in range(len(CORNERS)):
        out.append((head + TEMPLATES["mark_exists"][0].format(corner=CORNERS[corner]),
                    "yes" if corner in marks else "no", "mark_exists", {"corner": corner}))
        if corner in marks:
            out.append((head + TEMPLATES["mark_color"][0].format(corner=CORNERS[corner]), COLORS[marks[corner]],
                        "mark_color", {"corner": corner}))
    for h in (0, 1):
        o = objs[h]
        if o.role == "key" and o.dot >= 0 and bool(o.visible.all()):
            out.append((head + TEMPLATES["dot_color"][0].format(host=_name(scene.key[h])), COLORS[o.dot],
                        "dot_color", {"objects": [h]}))
    for i, o in enumerate(objs):
        steady = (o.role != "key" and bool(o.visible.all()) and int(o.color.min()) == int(o.color.max())
                  and float(np.ptp(o.x)) == 0.0 and float(np.ptp(o.y)) == 0.0)
        if not steady:
            continue
        if shapes.count(o.shape) == 1:
            shape = SHAPES[o.shape]
            out.append((head + TEMPLATES["object_color"][0].format(shape=shape), COLORS[int(o.color[0])],
                        "object_color", {"objects": [i]}))
            dx, dy = float(o.x[0]) - 32.0, float(o.y[0]) - 32.0
            if abs(abs(dx) - abs(dy)) > 2.0:
                side = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("bottom" if dy > 0 else "top")
                out.append((head + TEMPLATES["object_place"][0].format(shape=shape), side, "object_place",
                            {"objects": [i]}))
        if colors.count(int(o.color[0])) == 1:
            out.append((head + TEMPLATES["object_shape"][0].format(color=COLORS[int(o.color[0])]), SHAPES[o.shape],
                        "object_shape", {"objects": [i]}))
    if len(out) > limit:  # balanced over kinds: one of a random kind at a time
        groups: dict[str, list] = {}
        for item in out:
            groups.setdefault(item[2], []).append(item)
        for g in groups.values():
            rng.shuffle(g)
        order = list(groups)
        picked: list[tuple[str, str, str, dict]] = []
        while len(picked) < limit:
            for j in rng.permutation(len(order)):
                g = groups[order[int(j)]]
                if g and len(picked) < limit:
                    picked.append(g.pop())
        out = picked
    return out


def query_targets(scene, kind: str, spec: dict | None = None) -> tuple[int, int, int]:
    """What a question tells the model to look for, as class ids ``(shape, colour,
    corner)`` with -100 where the question names none: the subject's shape (or the
    dot's host's), the colour of an ``object_shape`` question, the corner of a mark
    question. ``spec`` as in :func:`evidence_mask`. Training only (``TrainConfig.query_aux``)."""
    q = scene.query
    if kind in ("mark_color", "mark_exists"):
        return -100, -100, int(spec["corner"] if spec else q["corner"])
    if spec:
        o = scene.objects[spec["objects"][0]]
    elif kind == "dot_color":
        o = scene.objects[q["host"]]
    else:
        o = scene.objects[q["subject"]]
    if kind == "object_shape":
        return -100, int(o.color[0]), -100
    return int(o.shape), -100, -100


#: Tag mixed into training seeds so that training clips never share a random
#: stream with :func:`mukv.bench.clip_at` or with :func:`eval_clips`.
TAG_TRAIN = 0x7A1
TAG_EVAL = 0xE7A


def sample_training_clip(rng: np.random.Generator | int, num_frames: int = 8, size: int = 64,
                         max_questions: int = 3, single: float = 0.3, plain: float = 0.0,
                         extra: int = 0, kinds: Sequence[str] | None = None, fillers: str = "one",
                         max_filler: int = 12, hard_negatives: float = 0.0) -> TrainingClip:
    """A training clip: with probability ``plain`` :func:`mukv.bench.sample_clip` without
    distractors (the questioned scene on empty background frames: an easy start);
    with probability ``single`` exactly :func:`mukv.bench.sample_clip`
    (one questioned scene among distractors); otherwise up to ``max_questions``
    questioned scenes packed into ``num_frames`` frames, the gaps filled with
    distractor scenes.

    Uniqueness holds as in a benchmark stream: every questioned scene's key pair
    co-occurs in no other scene of the clip (each new questioned scene is built
    with every pair of the earlier ones blocked; distractors with every key pair
    blocked), so each question has exactly one answer in the clip.

    With ``extra`` > 0, every questioned scene also gets up to that many
    :func:`extra_questions` (static facts of the same scene).

    ``kinds``: the question kinds to draw from, uniformly over the sequence (a kind
    repeated is drawn that many times as often); default every kind once.

    Clips that look like a long stream's scenes (packed clips only): ``fillers="many"``
    fills every gap with several filler scenes of 2 to ``max_filler`` frames
    (log-uniform, past a scene's natural length its last state holds, as a stream's
    fillers do) instead of one distractor per gap; ``hard_negatives`` is the share of
    those fillers built around one key object of a questioned scene of the clip (never
    both: its key pair stays unique), so that the question's query vector must match
    both named objects to find its scene (the retrieval loss then sees them as in-clip
    negatives).
    """
    from mukv.bench import KINDS, pose, render_scene, sample_clip
    from mukv.bench.scene import MIN_SCENE_LEN, N_IDENTITIES, blocked_matrix, make_scene

    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    if fillers not in ("one", "many"):
        raise ValueError(f"fillers must be 'one' or 'many'; got {fillers!r}")
    if not 0.0 <= hard_negatives <= 1.0 or max_filler < 2:
        raise ValueError(f"hard_negatives must be in [0, 1] and max_filler >= 2; got {hard_negatives}, {max_filler}")
    pool = tuple(kinds) if kinds else KINDS
    unknown = sorted(set(pool) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown question kinds {unknown}; kinds are {list(KINDS)}")
    u = rng.random()

    def with_extras(frames, posed) -> TrainingClip:
        """``posed``: (text, answer, kind, scene, offset) of each questioned scene."""
        questions, sources = [], []
        for text, answer, kind, scene, offset in posed:
            questions.append((text, answer, kind))
            sources.append((scene, offset, None))
            if extra > 0:
                for etext, eanswer, ekind, spec in extra_questions(scene, rng, extra):
                    if etext != text:
                        questions.append((etext, eanswer, ekind))
                        sources.append((scene, offset, spec))
        return TrainingClip(frames, questions, sources=sources)

    if u < plain:
        c = sample_clip(rng, num_frames, size=size, distractors=False, kinds=pool)
        return with_extras(c.frames, [(c.question, c.answer, c.kind, c.scene, c.evidence_start)])
    if u < plain + single or max_questions <= 1:
        c = sample_clip(rng, num_frames, size=size, kinds=pool)
        return with_extras(c.frames, [(c.question, c.answer, c.kind, c.scene, c.evidence_start)])
    want = max_questions  # as many as fit
    scenes = []
    pairs = np.zeros((N_IDENTITIES, N_IDENTITIES), dtype=bool)
    used = 0
    for _ in range(want):
        room = num_frames - used
        if room < 2:
            break
        scene = None
        for _try in range(8):
            kind = pool[int(rng.integers(len(pool)))]
            try:
                cand = make_scene(rng, kind, blocked=pairs, max_len=max(MIN_SCENE_LEN, room), attempts=20)
            except RuntimeError:
                continue
            if cand.n <= room:
                scene = cand
                break
        if scene is None:
            break
        ids = sorted(set().union(*(o.identities() for o in scene.objects)))
        for a in ids:
            for b in ids:
                if a != b:
                    pairs[a, b] = True
        scenes.append(scene)
        used += scene.n
    if not scenes:
        c = sample_clip(rng, num_frames, size=size, kinds=pool)
        return with_extras(c.frames, [(c.question, c.answer, c.kind, c.scene, c.evidence_start)])
    blocked = blocked_matrix([s.key for s in scenes])
    gaps = np.bincount(rng.integers(0, len(scenes) + 1, size=num_frames - used), minlength=len(scenes) + 1)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    t = 0
    posed = []
    for i in range(len(scenes) + 1):
        g = int(gaps[i])
        first = True
        while g:
            d = _filler_scene(rng, scenes, blocked, hard_negatives)
            length = g if fillers == "one" else min(g, _filler_length(rng, max_filler))
            start = max(0, d.n - length) if i == 0 and first else 0  # the clip opens at the end of a scene
            frames[t : t + length] = render_scene(d, size, length=length, start=start)
            t += length
            g -= length
            first = False
        if i < len(scenes):
            s = scenes[i]
            frames[t : t + s.n] = render_scene(s, size)
            text, answer = pose(s)
            posed.append((text, answer, s.kind, s, t))
            t += s.n
    return with_extras(frames, posed)


def _filler_length(rng: np.random.Generator, most: int) -> int:
    """Frames of one filler scene: log-uniform from 2 to ``most`` (a stream's fillers are log-uniform too)."""
    return int(round(math.exp(math.log(2) + rng.random() * (math.log(most) - math.log(2)))))


def _filler_scene(rng: np.random.Generator, scenes: list, blocked: np.ndarray, hard: float):
    """A distractor scene; with probability ``hard`` one built around a key object of a questioned
    scene (with an object it never forms a questioned key pair with)."""
    from mukv.bench.scene import N_IDENTITIES, make_scene, split_identity

    if hard > 0 and scenes and rng.random() < hard:
        target = scenes[int(rng.integers(len(scenes)))]
        a = int(target.key[int(rng.integers(2))])
        ca, sa = split_identity(a)
        cands = [x for x in range(N_IDENTITIES)
                 if split_identity(x)[0] != ca and split_identity(x)[1] != sa and not blocked[a, x]]
        if cands:
            x = int(cands[int(rng.integers(len(cands)))])
            try:
                return make_scene(rng, None, key=(a, x), blocked=blocked, attempts=20)
            except RuntimeError:
                pass
    return make_scene(rng, None, blocked=blocked)


class TrainingClips(torch.utils.data.Dataset):
    """Map-style dataset: item ``i`` is :func:`sample_training_clip` of the
    generator seeded ``[seed, TAG_TRAIN, i]`` (any worker makes any item; a
    resumed run continues the same sequence)."""

    def __init__(self, seed: int, length: int, label_grid: int | None = None, evidence_grid: int | None = None,
                 query_labels: bool = False, **kwargs: Any):
        self.seed, self.length, self.kwargs = int(seed), int(length), kwargs
        self.label_grid, self.evidence_grid, self.query_labels = label_grid, evidence_grid, bool(query_labels)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> TrainingClip:
        clip = sample_training_clip(np.random.default_rng([self.seed, TAG_TRAIN, int(i)]), **self.kwargs)
        if self.label_grid:
            clip.labels = token_labels(clip.frames, self.label_grid)
        if self.evidence_grid:
            n = clip.frames.shape[0]
            clip.evidence = np.stack([evidence_mask(sc, off, n, self.evidence_grid, spec)
                                      for sc, off, spec in clip.sources])
        if self.evidence_grid or self.query_labels:
            clip.query_labels = np.array([query_targets(sc, kind, spec) for (sc, _, spec), (_, _, kind)
                                          in zip(clip.sources, clip.questions)], dtype=np.int64).reshape(-1, 3)
        n = clip.frames.shape[0]
        clip.spans = np.array([(max(0, off), min(n, off + sc.n)) for sc, off, _ in clip.sources],
                              dtype=np.int64).reshape(-1, 2)
        clip.sources = []  # scenes stay in the worker
        return clip


def eval_clips(seed: int, per_kind: int, num_frames: int = 8, kinds: Sequence[str] | None = None) -> list[Any]:
    """Held-out evaluation clips, ``per_kind`` of every question kind, exactly as
    :func:`mukv.bench.sample_clip` draws them (one questioned scene among distractors)."""
    from mukv.bench import KINDS, sample_clip

    out = []
    for k, kind in enumerate(kinds or KINDS):
        for i in range(per_kind):
            out.append(sample_clip(np.random.default_rng([int(seed), TAG_EVAL, k, i]), num_frames, kinds=(kind,)))
    return out


def collate(items: list[TrainingClip]) -> dict[str, Any]:
    """Stack frames (``uint8 [B, F, S, S, 3]``) and flatten the questions (with their clip index)."""
    frames = torch.from_numpy(np.stack([c.frames for c in items]))
    qs = [(i, *q) for i, c in enumerate(items) for q in c.questions]
    out = {"frames": frames, "clip": torch.tensor([q[0] for q in qs]), "questions": [q[1] for q in qs],
           "answers": [q[2] for q in qs], "kinds": [q[3] for q in qs]}
    if items[0].labels is not None:
        out["labels"] = torch.from_numpy(np.stack([c.labels for c in items]))
    if items[0].evidence is not None:
        out["evidence"] = torch.from_numpy(np.concatenate([c.evidence for c in items]))  # [Q, F, g, g]
    if items[0].query_labels is not None:
        out["query_labels"] = torch.from_numpy(np.concatenate([c.query_labels for c in items]))  # [Q, 3]
    if items[0].spans is not None:
        out["spans"] = torch.from_numpy(np.concatenate([c.spans for c in items]))  # [Q, 2]
    return out


def iterate_batches(dataset: TrainingClips, batch: int, start: int, workers: int, rank: int = 0,
                    world: int = 1) -> Iterator[dict[str, Any]]:
    """Batches of dataset items from item ``start`` on (resumable), rendered in worker processes.

    With data parallelism, rank ``r`` of ``world`` reads items ``start + r``, ``start + r + world``, ...,
    so the ranks together read the same items as one process would, whatever the number of GPUs."""
    sampler = range(start + rank, len(dataset), world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
        drop_last=True,
    )
    yield from loader
