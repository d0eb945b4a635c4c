"""Training of mukv-tiny, the small Video-LLM that ships with mukv.

No real Video-LLM weights can be downloaded where mukv is built, so whether MuKV
answers better than its baselines is measured with a model trained here: a
LLaVA-OneVision built from transformers' own classes (a tiny SigLIP vision tower,
LLaVA-OneVision's projector and 2x2 pooling, a tiny Qwen2 language model) with a
word-level tokenizer over the benchmark's vocabulary. Every code path at answer
time is the real one.

The model is trained from scratch on short, context-complete clips of
:mod:`mukv.bench` and learns to answer from three kinds of memory, on the same
clips in the same step (the vision tower runs once per clip and its tokens feed
all three):

``full`` (a)
    system prompt + every frame's visual tokens in one causal sequence + the
    answer prompt: the "whole clip in context" figure.
``frames`` (b)
    ReKV-style memory, and the memory of mukv's baselines: every frame prefilled
    on its own after the system prompt (positions ``P .. P + T - 1``, so frames
    overlap in position), their KV concatenated, then the answer prompt.
``mukv`` (c)
    MuKV's memory: patch, frame and segment blocks prefilled on their own,
    compressed with mukv's own scorer and compressor plugins (selection under
    ``no_grad`` with the current weights), the blocks chosen by MuKV's retrieval
    (cosine to the query vector, segment-guided rerank), then the answer prompt.

Gradients flow through every block prefill. :func:`prefill` is the training
twin of :meth:`mukv.model.HFVideoLLM.prefill_blocks` (same HF modules, same
positions, same lower-right causal attention, same last-layer column sums);
``tests/test_train.py`` checks that both give the same KV, scores and logits.

The loss is cross-entropy on the answer word and the end token. Training clips
may carry several questioned scenes (:func:`sample_training_clip`): the memory
is built once and every question is answered from it, which multiplies the
supervision per unit of compute.

Command line: ``python benchmarks/train_tiny.py --help``.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .blocks import PrefilledBlocks
from .config import LevelConfig, MukvConfig

# ------------------------------------------------------------------------------ shapes
#: The shipped model: 196 visual tokens per frame (112 px, patch 4 -> 28x28 -> pooled 14x14),
#: so mukv's default levels (49 / 196 / 784 tokens) apply unchanged.
MUKV_TINY_SHAPE: dict[str, Any] = dict(
    text_config=dict(model_type="qwen2", hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                     num_attention_heads=8, num_key_value_heads=2, rope_theta=10_000.0,
                     max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True),
    vision_config=dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=512,
                       num_hidden_layers=4, num_attention_heads=4, image_size=112, patch_size=4,
                       vision_use_head=False),
)

#: A toy of the same family for CPU tests (49 visual tokens per frame: 28 px, patch 2 -> 14x14 -> 7x7).
TOY_SHAPE: dict[str, Any] = dict(
    text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rope_theta=10_000.0,
                     max_position_embeddings=32768, tie_word_embeddings=True),
    vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=2,
                       vision_use_head=False),
)

#: A shape that trains on a laptop CPU for recipe experiments: 56 px frames, 49 tokens per frame
#: (toy_config's levels), a 4-layer, 128-wide language model. Not shipped.
SMALL_SHAPE: dict[str, Any] = dict(
    text_config={**TOY_SHAPE["text_config"], "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4},
    vision_config={**TOY_SHAPE["vision_config"], "hidden_size": 64, "intermediate_size": 256,
                   "num_hidden_layers": 2, "image_size": 56, "patch_size": 4},
)

#: The small shape's language model at 196 visual tokens per frame (56 px, patch 2 -> 28x28 -> pooled
#: 14x14), so mukv's default levels apply; a light vision tower keeps steps cheap on the GPU.
SMALL_196_SHAPE: dict[str, Any] = dict(
    text_config=dict(SMALL_SHAPE["text_config"]),
    vision_config={**SMALL_SHAPE["vision_config"], "patch_size": 2},
)

#: :data:`SMALL_196_SHAPE` with a 192-wide, 6-head language model.
MEDIUM_196_SHAPE: dict[str, Any] = dict(
    text_config={**SMALL_SHAPE["text_config"], "hidden_size": 192, "intermediate_size": 576,
                 "num_attention_heads": 6},
    vision_config=dict(SMALL_196_SHAPE["vision_config"]),
)

#: :data:`SMALL_SHAPE` (49 tokens per frame) with the 192-wide language model of :data:`MEDIUM_196_SHAPE`.
MEDIUM_SHAPE: dict[str, Any] = dict(
    text_config=dict(MEDIUM_196_SHAPE["text_config"]),
    vision_config=dict(SMALL_SHAPE["vision_config"]),
)

SHAPES: dict[str, dict[str, Any]] = {"mukv-tiny": MUKV_TINY_SHAPE, "toy": TOY_SHAPE, "small": SMALL_SHAPE,
                                     "small-196": SMALL_196_SHAPE, "medium": MEDIUM_SHAPE,
                                     "medium-196": MEDIUM_196_SHAPE}

REGIMES: tuple[str, ...] = ("full", "frames", "mukv")


def toy_config() -> MukvConfig:
    """MuKV's levels for the toy shape's 7x7 grid: one-row patches, frames, 4-frame segments.

    Four segments are retrieved, not MuKV's twelve: on long streams mukv-tiny answers best from
    contexts of about 350-800 tokens and at its prior from 2,000 (docs/answer-quality-results.md);
    a training clip of 8 frames holds two segments, so training is the same either way."""
    return MukvConfig.build({"levels": [
        {"name": "patch", "extractor": "patch_raster", "frames": 1, "tokens": 7, "keep_ratio": 0.3, "alpha": 0.5,
         "top_k": 20, "rerank_weight": 0.3},
        {"name": "frame", "extractor": "frame", "frames": 1, "keep_ratio": 0.1, "alpha": 0.7, "top_k": 32,
         "rerank_weight": 0.3},
        {"name": "segment", "extractor": "segment", "frames": 4, "keep_ratio": 0.8, "alpha": 0.8, "top_k": 4},
    ]})


def config_for(adapter) -> MukvConfig:
    """The levels a model of this shape trains and answers with: mukv's defaults at 196
    tokens per frame, :func:`toy_config`'s at 49."""
    return toy_config() if adapter.tokens_per_frame == 49 else MukvConfig.build()


def build_model(shape: str | dict[str, Any] = "mukv-tiny", seed: int = 0, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, name: str = "mukv-tiny", calibrate: bool = True):
    """A LLaVA-OneVision of ``shape`` with random weights (seeded), wrapped in
    :class:`~mukv.plugins.models.llava_onevision.LlavaOnevisionAdapter`.

    The tokenizer is :func:`mukv.tokenizer.build_word_tokenizer` over the
    benchmark's :data:`~mukv.bench.VOCABULARY` (plus the base words). With ``calibrate``
    the projector is initialised at the text-embedding scale (:func:`calibrate_projector`).
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    from mukv.bench import VOCABULARY
    from mukv.plugins.models.llava_onevision import LlavaOnevisionAdapter, onevision_config
    from mukv.tokenizer import build_word_tokenizer

    shape = SHAPES[shape] if isinstance(shape, str) else shape
    tokenizer = build_word_tokenizer(VOCABULARY)
    config = onevision_config(shape, tokenizer, exact_vocab=True)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlavaOnevisionForConditionalGeneration(config)
    model = model.to(dtype=dtype)
    adapter = LlavaOnevisionAdapter(model, tokenizer, name=name)
    if calibrate:
        calibrate_projector(adapter)
    return adapter


@torch.no_grad()
def visual_text_rms(adapter, frames: torch.Tensor | None = None) -> tuple[float, float]:
    """RMS of the visual embeddings of ``frames`` (default: one fixed benchmark clip) and of the text embeddings."""
    if frames is None:
        from mukv.bench import sample_clip

        frames = torch.from_numpy(sample_clip(np.random.default_rng(0), 4).frames)[None]
    frames = frames.to(adapter.device)
    was = adapter.model.training
    adapter.model.eval()
    try:
        v = encode(adapter, frames).float()
    finally:
        adapter.model.train(was)
    e = adapter.language_model.embed_tokens.weight.float()
    return float(v.pow(2).mean().sqrt()), float(e.pow(2).mean().sqrt())


@torch.no_grad()
def calibrate_projector(adapter) -> float:
    """Initialise the multi-modal projector so that visual embeddings enter the language
    model at the scale of the text embeddings: zero biases, ``linear_2`` rescaled so that
    the RMS of the visual tokens of a fixed clip equals the RMS of the token embeddings
    (transformers' default init leaves them ~5x larger, and training without
    :attr:`TrainConfig.vis_rms` let them grow to ~40x, which collapsed the visual tokens
    into attention sinks). Returns the scale applied."""
    proj = adapter.model.model.multi_modal_projector
    proj.linear_1.bias.zero_()
    proj.linear_2.bias.zero_()
    vis, txt = visual_text_rms(adapter)
    scale = txt / max(vis, 1e-12)
    proj.linear_2.weight.mul_(scale)
    return scale


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of the vision tower, projector (+ newline) and language model (tied head counted once)."""
    m = model.model
    vision = sum(p.numel() for p in m.vision_tower.parameters())
    lm = sum(p.numel() for p in m.language_model.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"vision": vision, "projector": total - vision - lm, "language": lm, "total": total}


# ------------------------------------------------------------------------------ data
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


# ------------------------------------------------------------------------------ attention
TRAIN_ATTN_IMPL = "mukv_train"
_state = threading.local()
_train_registered = False


def register_train_attention() -> None:
    """Register the "mukv_train" attention: inside :func:`_ours` calls, every layer runs
    mukv's :func:`~mukv.model.causal_attention` (lower-right causal sdpa, differentiable)
    and the named layer also records :func:`~mukv.model.attention_column_sums` under
    ``no_grad`` (exactly what :class:`~mukv.model.HFVideoLLM` computes at inference);
    every other call (the vision tower) goes to transformers' sdpa."""
    global _train_registered
    if _train_registered:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from .model import attention_column_sums, causal_attention

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if not getattr(_state, "active", False):
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
        out = causal_attention(query, key, value, scaling)
        cap = getattr(_state, "capture", None)
        if cap is not None and getattr(module, "layer_idx", None) in cap.layers:
            cap.record(query, key, scaling)
        if getattr(_state, "module", None) is module:
            with torch.no_grad():
                _state.colsum = attention_column_sums(query.detach(), key.detach(), scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(TRAIN_ATTN_IMPL, attention)
    AttentionMaskInterface.register(TRAIN_ATTN_IMPL, sdpa_mask)
    _train_registered = True


class EvidenceAttention:
    """Attention of the answer position to the evidence tokens, recorded during
    one answer-prompt forward (training only; see ``TrainConfig.attn_sup``).

    Args:
        layers: language-model layer indices whose attention is read.
        heads: the first ``heads`` query heads of each of those layers.
        evidence: float ``[Q, C]``, 1 on the context positions (system prompt +
            memory) that hold the question's evidence.
        rows: ``[Q]`` index, within the answer prompt, of the position that
            predicts the answer word.

    After the forward, :attr:`mass` is ``[Q, len(layers) * heads]``: the share of
    each head's attention (softmax over the whole context and the prompt up to
    that position) that falls on the evidence.
    """

    def __init__(self, layers: Sequence[int], heads: int, evidence: torch.Tensor, rows: torch.Tensor):
        self.layers, self.heads, self.evidence, self.rows = set(layers), int(heads), evidence, rows
        self._mass: list[torch.Tensor] = []

    def record(self, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
        """``query [Q, H, N, D]`` (the prompt), ``key [Q, Hkv, C + N, D]`` (context + prompt)."""
        q, h, n, d = query.shape
        c = key.shape[2] - n
        idx = torch.arange(q, device=query.device)
        rows = query[idx, : self.heads, self.rows].float()  # [Q, h, D]
        groups = h // key.shape[1]
        keys = key[:, torch.arange(self.heads, device=key.device) // groups].float()  # [Q, h, C + N, D]
        logits = torch.einsum("qhd,qhsd->qhs", rows, keys) * (scaling if scaling is not None else d ** -0.5)
        pos = torch.arange(c + n, device=key.device)
        logits = logits.masked_fill((pos[None, :] > c + self.rows[:, None])[:, None, :], float("-inf"))
        p = logits.softmax(-1)[..., : self.evidence.shape[1]]
        self._mass.append((p * self.evidence[:, None, :].to(p.dtype)).sum(-1))

    @property
    def mass(self) -> torch.Tensor:
        return torch.cat(self._mass, dim=1)


class MidCapture:
    """Records the residual stream entering language-model layer ``layer`` during
    the calls made while :attr:`key` is set (training only: the targets of
    ``TrainConfig.aux_mid`` and ``TrainConfig.query_aux``).

    Use as a context manager around a training forward; set :attr:`key` to a name
    before a call whose input hidden states ``[B, L, E]`` should be kept under it.
    """

    def __init__(self, adapter, layer: int):
        self.layer, self.key = int(layer), None
        self.store: dict[str, torch.Tensor] = {}
        self._module = adapter.language_model.layers[self.layer]
        self._handle = None

    def _hook(self, module, args, kwargs):
        if self.key is not None:
            self.store[self.key] = args[0] if args else kwargs["hidden_states"]

    def __enter__(self) -> "MidCapture":
        self._handle = self._module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()
        self.key = None


class _ours:
    """Marks a language-model call as causal aligned to the end (see :func:`register_train_attention`)."""

    def __init__(self, module: torch.nn.Module | None = None, capture: EvidenceAttention | None = None):
        self.module = module
        self.capture = capture
        self.colsum = None

    def __enter__(self) -> "_ours":
        self._saved = (getattr(_state, "active", False), getattr(_state, "module", None),
                       getattr(_state, "capture", None))
        _state.active, _state.module, _state.colsum, _state.capture = True, self.module, None, self.capture
        return self

    def __exit__(self, *exc: Any) -> None:
        self.colsum = getattr(_state, "colsum", None)
        _state.active, _state.module, _state.capture = self._saved
        _state.colsum = None


def training_mode(adapter, on: bool = True) -> None:
    """Switch ``adapter.model`` between training ("mukv_train" attention, train mode)
    and mukv's inference attention (eval mode)."""
    from .model import ATTN_IMPL

    if on:
        register_train_attention()
        adapter.model.set_attn_implementation(TRAIN_ATTN_IMPL)
        adapter.model.train()
    else:
        adapter.model.set_attn_implementation(ATTN_IMPL)
        adapter.model.eval()


# ------------------------------------------------------------------------------ forward pieces
KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), [B, H, S, D]


def _cache(kv: KV | None):
    from transformers import DynamicCache

    return DynamicCache() if kv is None else DynamicCache(ddp_cache_data=[(k, v) for k, v in kv])


def encode(adapter, frames: torch.Tensor) -> torch.Tensor:
    """``uint8 [B, F, S, S, 3]`` -> visual tokens ``[B, F, T, E]`` (with gradients):
    the adapter's own preprocessing and ``get_video_features`` (tower, projector, 2x2 pooling)."""
    b, f = frames.shape[:2]
    pixels = adapter.preprocess(frames.reshape(b * f, *frames.shape[2:]))
    pixels = pixels.reshape(b, f, *pixels.shape[1:])
    out = adapter.model.model.get_video_features(
        pixels, vision_feature_layer=adapter.feature_layer, vision_feature_select_strategy=adapter.select_strategy,
    ).pooler_output  # [B, F * T (+ 1), E]: newer transformers append the newline embedding
    return out[:, : f * adapter.tokens_per_frame].reshape(b, f, adapter.tokens_per_frame, -1)


def prefix_kv(adapter, system_prompt: str | None = None) -> KV:
    """KV of the system prompt ``[1, H, P, D]`` per layer (with gradients)."""
    ids = adapter.tokenize(adapter.default_system_prompt if system_prompt is None else system_prompt)
    cache = _cache(None)
    with _ours():
        adapter.language_model(input_ids=ids[None], past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def prefill(adapter, prefix: KV, embeds: torch.Tensor, attention: bool = False,
            hidden: list[torch.Tensor] | None = None, prefix_ids: torch.Tensor | None = None
            ) -> tuple[KV, torch.Tensor | None]:
    """Blocks ``[B, L, E]``, each on its own after the system prompt at positions
    ``P .. P + L - 1`` (the training twin of ``HFVideoLLM.prefill_blocks``).

    Returns the blocks' KV ``[B, H, L, D]`` per layer (prompt positions dropped)
    and, with ``attention``, the last layer's column sums ``[B, L]`` (no gradient).
    With ``hidden`` (a list), the blocks' final hidden states ``[B, L, E]`` are appended to it.

    With ``prefix_ids`` (the system prompt's ids ``[P]``) and no ``attention``, the
    system prompt is run again in front of every block instead of read from
    ``prefix``: the same KV (same tokens, same positions), but every attention call
    is then square and causal, which sdpa runs as flash attention in the backward
    pass too; the end-aligned mask of a cached prefix falls back to a kernel that
    materialises ``[B, H, L, P + L]`` scores on some torch builds.
    """
    b, length, _ = embeds.shape
    p = prefix[0][0].shape[2]
    if prefix_ids is not None and not attention:
        pe = adapter.language_model.embed_tokens(prefix_ids)[None].expand(b, -1, -1)
        seq = torch.cat([pe.to(embeds.dtype), embeds], dim=1)
        cache = _cache(None)
        positions = torch.arange(p + length, device=embeds.device)[None].expand(b, -1)
        with _ours():
            out = adapter.language_model(inputs_embeds=seq, past_key_values=cache, position_ids=positions,
                                         use_cache=True)
        if hidden is not None:
            hidden.append(out.last_hidden_state[:, p:])
        return [(layer.keys[:, :, p:], layer.values[:, :, p:]) for layer in cache.layers], None
    cache = _cache([(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prefix])
    positions = torch.arange(p, p + length, device=embeds.device)[None].expand(b, -1)
    last = adapter.language_model.layers[-1].self_attn
    with _ours(last if attention else None) as call:
        out = adapter.language_model(inputs_embeds=embeds, past_key_values=cache, position_ids=positions,
                                     use_cache=True)
    if hidden is not None:
        hidden.append(out.last_hidden_state)
    kv = [(layer.keys[:, :, p:], layer.values[:, :, p:]) for layer in cache.layers]
    cols = call.colsum[:, p:] if call.colsum is not None else None
    return kv, cols


def answer_logits(adapter, context: KV, ids: torch.Tensor, start: torch.Tensor, at: torch.Tensor,
                  capture: EvidenceAttention | None = None) -> torch.Tensor:
    """Logits of the answer prompt + teacher-forced answer run after ``context``.

    Args:
        context: ``[Q, H, C, D]`` per layer (system prompt + memory).
        ids: ``[Q, N]`` answer-prompt + answer token ids (right-padded).
        start: ``[Q]`` RoPE position of each row's first token (``C`` in ``HFVideoLLM.generate``).
        at: ``[Q, M]`` token positions (within ``ids``) whose next-token logits are wanted.
        capture: records the answer position's attention to the evidence.

    Returns:
        ``[Q, M, V]`` logits.
    """
    n = ids.shape[1]
    positions = start[:, None] + torch.arange(n, device=ids.device)[None]
    with _ours(capture=capture):
        hidden = adapter.language_model(input_ids=ids, past_key_values=_cache(context), position_ids=positions,
                                        use_cache=True).last_hidden_state
    hidden = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))
    return adapter.lm_head(hidden)


def query_vectors(adapter, prefix: KV, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[Q, V]`` last-layer key of each question's final token after the system
    prompt (``HFVideoLLM.query_vector``, batched over right-padded ``ids``)."""
    q = ids.shape[0]
    p = prefix[0][0].shape[2]
    cache = _cache([(k.expand(q, -1, -1, -1), v.expand(q, -1, -1, -1)) for k, v in prefix])
    positions = torch.arange(p, p + ids.shape[1], device=ids.device)[None].expand(q, -1)
    with _ours():
        adapter.language_model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True)
    keys = cache.layers[-1].keys  # [Q, H, P + N, D]
    last = keys[torch.arange(q, device=ids.device), :, p + lengths - 1]  # [Q, H, D]
    return last.reshape(q, -1).float()


def _cat_kv(parts: Sequence[KV]) -> KV:
    return [(torch.cat([p[y][0] for p in parts], dim=2), torch.cat([p[y][1] for p in parts], dim=2))
            for y in range(len(parts[0]))]


def _take(kv: KV, index: torch.Tensor) -> KV:
    return [(k.index_select(0, index), v.index_select(0, index)) for k, v in kv]


# ------------------------------------------------------------------------------ MuKV memory
@dataclass
class _Level:
    level: LevelConfig
    split: torch.Tensor  # [n_blocks, L] token indices in a window
    scorer: Any
    compressor: Any
    kept: int


def resolve_levels(adapter, config: MukvConfig) -> list[_Level]:
    """Each level of ``config`` with its registered extractor, scorer and compressor,
    built exactly as :class:`mukv.Session` builds them."""
    from .interfaces import Compressor, GranularityExtractor, TokenScorer
    from .registry import registry
    from .specs import build

    reg = registry()
    compressor = build("compressors", config.compression.compressor, config, Compressor, "compression.compressor", reg)
    out = []
    for i, lv in enumerate(config.levels):
        ext = build("extractors", lv.extractor, config, GranularityExtractor, f"levels.{i}.extractor", reg)
        scorer = build("scorers", lv.scorer if lv.scorer is not None else config.scoring.scorer, config, TokenScorer,
                       f"levels.{i}.scorer" if lv.scorer is not None else "scoring.scorer", reg)
        split = ext.split(lv, adapter.grid)
        out.append(_Level(lv, split, scorer, compressor, Compressor.kept_count(lv, split.shape[1])))
    return out


@dataclass
class LevelMemory:
    """Compressed blocks of one level for a batch of clips.

    Attributes:
        name: level name.
        kv: ``[B * n, H, K, D]`` per layer (clip-major), with gradients.
        vectors: ``[B, n, V]`` block vectors (float32, no gradient).
        n: blocks per clip.
        frames: frames per block window (block ``j`` of a clip covers frames
            ``[w * (j // per_window), w * (j // per_window) + w)``).
        per_window: blocks per window.
    """

    name: str
    kv: KV
    vectors: torch.Tensor
    n: int
    frames: int = 1
    per_window: int = 1

    def live_vectors(self, b: int) -> torch.Tensor:
        """``[B, n, V]`` the block vectors with gradients (mean last-layer key of the kept tokens)."""
        return self.kv[-1][0].float().mean(dim=2).reshape(b, self.n, -1)


def level_memory(adapter, prefix: KV, visual: torch.Tensor, lv: _Level,
                 prefilled: tuple[KV, torch.Tensor | None] | None = None) -> LevelMemory:
    """Prefill, score and compress every block of one level, as
    :class:`mukv.pipeline.Ingestor` does (selection under ``no_grad``).

    ``visual`` is ``[B, F, T, E]``; only whole windows of ``lv.level.frames`` frames make blocks.
    ``prefilled`` reuses an identical prefill (e.g. the frame blocks of regime (b)).
    """
    b, f, t, e = visual.shape
    w = lv.level.frames
    nw = f // w
    split = lv.split.to(visual.device)
    per_window, length = split.shape
    windows = visual[:, : nw * w].reshape(b * nw, w * t, e)
    embeds = windows[:, split].reshape(b * nw * per_window, length, e)
    need_att = lv.kept < length and getattr(lv.scorer, "needs_attention", False)
    if prefilled is None or (need_att and prefilled[1] is None):
        prefilled = prefill(adapter, prefix, embeds, attention=need_att)
    kv, cols = prefilled
    nb = embeds.shape[0]
    with torch.no_grad():
        if lv.kept >= length:
            kept = torch.arange(length, device=visual.device).expand(nb, -1)
        else:
            stacked = torch.stack([torch.stack((k.detach(), v.detach())) for k, v in kv])  # [Y, 2, nb, H, L, D]
            start = torch.arange(b * nw, device=visual.device).repeat_interleave(per_window) * w
            p = prefix[0][0].shape[2]
            blocks = PrefilledBlocks(
                level=lv.level, kv=stacked, attention=cols, token_index=split.repeat(b * nw, 1),
                frame_start=start, frame_end=start + w,
                positions=torch.arange(p, p + length, device=visual.device)[None].expand(nb, -1), grid=adapter.grid,
            )
            scores = lv.scorer.score(blocks)
            kept = lv.compressor.select(blocks, scores.to(visual.device)).to(visual.device)
    idx = kept[:, None, :, None]
    out = []
    for k, v in kv:
        g = idx.expand(-1, k.shape[1], -1, k.shape[3])
        out.append((k.gather(2, g), v.gather(2, g)))
    mem = LevelMemory(lv.level.name, out, torch.empty(0), nw * per_window, w, per_window)
    mem.vectors = mem.live_vectors(b).detach()
    return mem


def retrieve(memories: list[LevelMemory], config: MukvConfig, query: torch.Tensor, clip: torch.Tensor
             ) -> dict[str, torch.Tensor]:
    """MuKV's semi-hierarchical retrieval, batched over questions: for each level
    the block indices (within a clip) chosen for each question, ``[Q, k]``.

    Mirrors :class:`~mukv.plugins.retrievers.semi_hierarchical.SemiHierarchicalRetriever`
    over the memory backend's cosine search, with a short clip's top-k clamped
    to the blocks it has (``retrieval.on_short_stream = "clamp"``)."""
    r = config.retrieval
    qn = F.normalize(query.float(), dim=-1)
    cands: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    tops: dict[str, int] = {}
    for mem in memories:
        lv = config.level(mem.name)
        k = min(lv.top_k, mem.n)
        tops[mem.name] = k
        if k <= 0:
            continue
        unit = F.normalize(mem.vectors.float(), dim=-1)[clip]  # [Q, n, V]
        sims = torch.einsum("qnv,qv->qn", unit, qn)
        c = min(math.ceil(k * r.over_retrieval), mem.n)
        s, ids = sims.topk(c, dim=1)
        cands[mem.name] = (ids, s)
    context = None
    guide = r.guide_level
    vec = {m.name: m.vectors for m in memories}
    if guide is not None and guide in cands:
        ids = cands[guide][0][:, : r.rerank_n]
        v = vec[guide][clip[:, None], ids]  # [Q, N, V]
        context = v.float().mean(dim=1)
    out = {}
    for name, (ids, s) in cands.items():
        lv = config.level(name)
        if context is not None and name != guide and lv.rerank_weight > 0:
            v = vec[name][clip[:, None], ids].float()
            cos = F.cosine_similarity(v, context[:, None], dim=-1)
            s = (1.0 - lv.rerank_weight) * s + lv.rerank_weight * cos
            order = s.argsort(dim=1, descending=True)
            ids = ids.gather(1, order)
        out[name] = ids[:, : tops[name]]
    return out


def retrieval_loss(memories: list[LevelMemory], query: torch.Tensor, clip: torch.Tensor, spans: torch.Tensor,
                   tau: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """Contrastive loss that teaches MuKV's retrieval to find the questioned scene.

    For each level, each question's query vector (``[Q, V]``, with gradients) is scored
    (cosine / ``tau``) against every block vector of every clip of the batch; the
    positives are the blocks of its own clip whose frames overlap its scene
    (``spans``, ``[Q, 2]``), every other block (other scenes of the clip, other clips)
    is a negative. Loss: ``-log(sum over positives of softmax)``, averaged over
    questions and levels. Stats: ``ret_top1_<level>``, the share of questions whose
    best-scoring block is a positive."""
    qn = F.normalize(query.float(), dim=-1)
    q = query.shape[0]
    losses, stats = [], {}
    for mem in memories:
        b = mem.vectors.shape[0]
        vec = F.normalize(mem.live_vectors(b), dim=-1).reshape(b * mem.n, -1)  # [B * n, V]
        logits = qn @ vec.T / tau  # [Q, B * n]
        j = torch.arange(mem.n, device=query.device)
        start = (j // mem.per_window) * mem.frames
        own = torch.zeros(q, b, mem.n, dtype=torch.bool, device=query.device)
        hit = (start[None] < spans[:, 1:2]) & (start[None] + mem.frames > spans[:, 0:1])  # [Q, n]
        own[torch.arange(q, device=query.device), clip] = hit
        pos = own.reshape(q, -1)
        ok = pos.any(1)
        if not bool(ok.any()):
            continue
        lse_all = logits.logsumexp(1)
        lse_pos = logits.masked_fill(~pos, float("-inf")).logsumexp(1)
        losses.append((lse_all - lse_pos)[ok].mean())
        best = logits.argmax(1)
        stats[f"ret_top1_{mem.name}"] = float(pos[torch.arange(q, device=query.device), best][ok].float().mean())
    if not losses:
        return query.sum() * 0.0, stats
    return sum(losses) / len(losses), stats


def mukv_context(prefix: KV, memories: list[LevelMemory], chosen: dict[str, torch.Tensor], clip: torch.Tensor) -> KV:
    """System prompt + every chosen block of every level, ``[Q, H, C, D]`` per layer
    (the order inside the context does not change the answer: attention over a
    cache is order-free; each key keeps the position it was computed at)."""
    q = clip.shape[0]
    parts = [[(k.expand(q, -1, -1, -1), v.expand(q, -1, -1, -1)) for k, v in prefix]]
    for mem in memories:
        if mem.name not in chosen:
            continue
        ids = chosen[mem.name]  # [Q, k]
        rows = (clip[:, None] * mem.n + ids).reshape(-1)
        kk = ids.shape[1]
        part = []
        for k, v in mem.kv:
            h, kt, d = k.shape[1:]
            part.append((k.index_select(0, rows).reshape(q, kk, h, kt, d).transpose(1, 2).reshape(q, h, kk * kt, d),
                         v.index_select(0, rows).reshape(q, kk, h, kt, d).transpose(1, 2).reshape(q, h, kk * kt, d)))
        parts.append(part)
    return _cat_kv(parts)


# ------------------------------------------------------------------------------ text
@dataclass
class QuestionBatch:
    """Token ids of a batch of questions.

    Attributes:
        ids: ``[Q, N]`` answer prompt + answer word + end token, right-padded.
        at: ``[Q, 2]`` positions whose next-token logits predict the answer and the end token.
        targets: ``[Q, 2]`` answer word id, end token id.
        query_ids: ``[Q, M]`` query-template ids (right-padded), ``query_len`` ``[Q]``.
    """

    ids: torch.Tensor
    at: torch.Tensor
    targets: torch.Tensor
    query_ids: torch.Tensor
    query_len: torch.Tensor


def encode_questions(adapter, questions: Sequence[str], answers: Sequence[str] | None = None,
                     device: torch.device | str = "cpu") -> QuestionBatch:
    """Tokenize questions with the adapter's templates (answers optional: at evaluation
    the answer slot holds a pad token and only the first logits row matters)."""
    tok = adapter.tokenizer
    eos = tok.eos_token_id
    pad = tok.pad_token_id
    rows, at, targets, qrows = [], [], [], []
    for i, q in enumerate(questions):
        prompt = tok(adapter.answer_template.format(question=q), add_special_tokens=False)["input_ids"]
        if answers is not None:
            a = tok(answers[i], add_special_tokens=False)["input_ids"]
            if len(a) != 1:
                raise ValueError(f"answer {answers[i]!r} is not one token of the tokenizer")
            a = a[0]
        else:
            a = pad
        rows.append(prompt + [a])
        at.append([len(prompt) - 1, len(prompt)])
        targets.append([a, eos])
        qrows.append(tok(adapter.query_template.format(question=q), add_special_tokens=False)["input_ids"])

    def pad_rows(rs):
        n = max(len(r) for r in rs)
        return torch.tensor([r + [pad] * (n - len(r)) for r in rs], dtype=torch.long, device=device)

    return QuestionBatch(pad_rows(rows), torch.tensor(at, device=device), torch.tensor(targets, device=device),
                         pad_rows(qrows), torch.tensor([len(r) for r in qrows], device=device))


# ------------------------------------------------------------------------------ one step
@dataclass
class RegimeOptions:
    """What a step computes.

    Attributes:
        regimes: subset of :data:`REGIMES`.
        offset_prob: probability that a question of regimes (b)/(c) starts its
            answer prompt past the context end (a long stream's answer sits
            thousands of positions after the blocks' positions).
        max_offset: largest such extra offset.
    """

    regimes: tuple[str, ...] = REGIMES
    offset_prob: float = 0.5
    max_offset: int = 16384


def memory_logits(adapter, levels: list[_Level], config: MukvConfig, frames: torch.Tensor, clip: torch.Tensor,
                  qb: QuestionBatch, opts: RegimeOptions, generator: torch.Generator | None = None,
                  visual: torch.Tensor | None = None, hidden: dict[str, torch.Tensor] | None = None,
                  evidence: torch.Tensor | None = None, attn_heads: tuple[tuple[int, ...], int] | None = None,
                  masses: dict[str, torch.Tensor] | None = None, mid: MidCapture | None = None,
                  retrieval: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Logits ``[Q, 2, V]`` (answer word, end token) for every regime in ``opts``,
    from one encoding of the clips (``visual``, computed here if not given).
    Gradients flow when grad mode is on. With ``hidden`` (a dict), the final
    hidden states of the visual tokens are stored there (``"full"``: ``[B, F * T, E]``,
    ``"frames"``: ``[B * F, T, E]``) for the auxiliary perception loss. With
    ``evidence`` (bool ``[Q, F * T]``, :func:`evidence_mask` flattened),
    ``attn_heads`` (layers, heads) and ``masses`` (a dict), the answer position's
    attention mass on the evidence (:class:`EvidenceAttention`) of regimes (a)
    and (b), whose memory keeps every visual token in clip order, is stored there.
    With ``mid``, the whole-clip regime's visual tokens (``"visual"``, ``[B, F * T, E]``)
    and answer positions (``"answer"``, ``[Q, E]``) entering ``mid.layer`` are recorded.
    With ``retrieval`` (a dict holding ``"spans"``, ``[Q, 2]``), regime (c) also puts
    :func:`retrieval_loss` there (``"loss"``, ``"stats"``), its query vectors computed
    with gradients."""
    dev = frames.device
    if visual is None:
        visual = encode(adapter, frames)  # [B, F, T, E]
    b, f, t, e = visual.shape
    prefix = prefix_kv(adapter, config.generation.system_prompt)
    p = prefix[0][0].shape[2]
    system = config.generation.system_prompt
    ids = adapter.tokenize(adapter.default_system_prompt if system is None else system).to(dev)
    q = clip.shape[0]
    out: dict[str, torch.Tensor] = {}

    def capture() -> EvidenceAttention | None:
        if evidence is None or attn_heads is None or masses is None:
            return None
        ev = torch.cat([torch.zeros(q, p, dtype=torch.bool, device=dev), evidence.to(dev)], dim=1)
        return EvidenceAttention(attn_heads[0], attn_heads[1], ev, qb.at[:, 0])

    def offsets() -> torch.Tensor:
        if opts.offset_prob <= 0 or not torch.is_grad_enabled():
            return torch.zeros(q, dtype=torch.long, device=dev)
        u = torch.rand(q, generator=generator, device="cpu")
        extra = torch.randint(0, opts.max_offset + 1, (q,), generator=generator, device="cpu")
        return torch.where(u < opts.offset_prob, extra, torch.zeros_like(extra)).to(dev)

    if "full" in opts.regimes:
        hs: list[torch.Tensor] | None = [] if hidden is not None else None
        if mid is not None:
            mid.key = "visual"
        kv, _ = prefill(adapter, prefix, visual.reshape(b, f * t, e), hidden=hs, prefix_ids=ids)
        if mid is not None:
            mid.store["visual"] = mid.store["visual"][:, -f * t:]
            mid.key = "answer"
        if hs:
            hidden["full"] = hs[0]
        ctx = _cat_kv([[(k.expand(q, -1, -1, -1), v.expand(q, -1, -1, -1)) for k, v in prefix], _take(kv, clip)])
        start = torch.full((q,), p + f * t, dtype=torch.long, device=dev)
        cap = capture()
        out["full"] = answer_logits(adapter, ctx, qb.ids, start, qb.at, cap)
        if mid is not None:
            h = mid.store["answer"]
            mid.store["answer"] = h[torch.arange(q, device=dev), qb.at[:, 0]]
            mid.key = None
        if cap is not None:
            masses["full"] = cap.mass
        del kv, ctx
    frame_level = next((lv for lv in levels if lv.level.frames == 1 and lv.split.shape == (1, t)), None)
    frames_pre = None
    if "frames" in opts.regimes or "mukv" in opts.regimes:
        need_att = "mukv" in opts.regimes and frame_level is not None and frame_level.kept < t
        hs = [] if hidden is not None else None
        frames_pre = prefill(adapter, prefix, visual.reshape(b * f, t, e), attention=need_att, hidden=hs,
                             prefix_ids=ids)
        if hs:
            hidden["frames"] = hs[0]
    if "frames" in opts.regimes:
        kv = frames_pre[0]
        mem = [(k.reshape(b, f, *k.shape[1:]).transpose(1, 2).reshape(b, k.shape[1], f * t, k.shape[3]),
                v.reshape(b, f, *v.shape[1:]).transpose(1, 2).reshape(b, v.shape[1], f * t, v.shape[3])) for k, v in kv]
        ctx = _cat_kv([[(k.expand(q, -1, -1, -1), v.expand(q, -1, -1, -1)) for k, v in prefix], _take(mem, clip)])
        start = p + f * t + offsets()
        cap = capture()
        out["frames"] = answer_logits(adapter, ctx, qb.ids, start, qb.at, cap)
        if cap is not None:
            masses["frames"] = cap.mass
        del mem, ctx
    if "mukv" in opts.regimes:
        memories = []
        for lv in levels:
            if f // lv.level.frames == 0:
                continue
            reuse = frames_pre if lv is frame_level else None
            memories.append(level_memory(adapter, prefix, visual, lv, reuse))
        if retrieval is not None:
            qv = query_vectors(adapter, prefix, qb.query_ids, qb.query_len)
            retrieval["loss"], retrieval["stats"] = retrieval_loss(
                memories, qv, clip, retrieval["spans"].to(dev), retrieval.get("tau", 0.1))
            qv = qv.detach()
        else:
            with torch.no_grad():
                qv = query_vectors(adapter, [(k.detach(), v.detach()) for k, v in prefix], qb.query_ids,
                                   qb.query_len)
        with torch.no_grad():
            chosen = retrieve(memories, config, qv, clip)
        ctx = mukv_context(prefix, memories, chosen, clip)
        start = ctx[0][0].shape[2] + offsets()
        out["mukv"] = answer_logits(adapter, ctx, qb.ids, start, qb.at)
    return out


def loss_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the answer word and the end token; and per-row correctness of the answer word."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    correct = logits[:, 0].argmax(-1) == targets[:, 0]
    return loss, correct


# ------------------------------------------------------------------------------ training
@dataclass
class TrainConfig:
    """Hyper-parameters of a run (saved with every checkpoint)."""

    shape: str = "mukv-tiny"
    seed: int = 0
    steps: int = 3000
    batch: int = 64
    frames: int = 8
    max_questions: int = 3
    single: float = 0.3
    plain: float = 0.0
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 150
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    weights: dict[str, float] = field(default_factory=lambda: {"full": 1.0, "frames": 1.0, "mukv": 1.0})
    aux: float = 0.0
    aux_lm: float = 0.0
    vis_rms: float = 1.0
    attn_sup: float = 0.0
    attn_layers: tuple[int, ...] = (3, 4)
    attn_heads: int = 2
    aux_mid: float = 0.0
    query_aux: float = 0.0
    mid_layer: int = 2
    freeze_vision: bool = False
    retrieval: float = 0.0
    retrieval_tau: float = 0.1
    schedule_start: int = 0
    offset_prob: float = 0.5
    max_offset: int = 16384
    bf16: bool = True
    workers: int = 8

    def lr_at(self, step: int) -> float:
        """Linear warmup then cosine to ``min_lr_ratio * lr`` at ``steps``; both start at
        ``schedule_start`` (a resumed run may restart its schedule there)."""
        step, steps = step - self.schedule_start, self.steps - self.schedule_start
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, steps - self.warmup))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA); no weight decay on norms, biases and embeddings."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in n or "norm" in n or "position" in n else decay).append(p)
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas,
                             fused=fused)


class Trainer:
    """Runs training steps on a model adapter.

    Args:
        adapter: a :class:`LlavaOnevisionAdapter` (float32 weights).
        cfg: hyper-parameters.
        config: the mukv configuration whose levels regime (c) builds (default: mukv's).
    """

    def __init__(self, adapter, cfg: TrainConfig, config: MukvConfig | None = None):
        self.adapter = adapter
        self.cfg = cfg
        self.config = config or MukvConfig.build()
        self.levels = resolve_levels(adapter, self.config)
        self.device = adapter.device
        e = adapter.language_model.config.hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            #: training-only head: per-token perception targets from the visual tokens (not shipped)
            self.aux_head = torch.nn.Linear(e, sum(AUX_CLASSES)).to(self.device)
            #: the same targets read from the language model's final hidden states at the visual positions
            self.aux_head_lm = torch.nn.Linear(e, sum(AUX_CLASSES)).to(self.device)
            #: the same targets read from the residual stream entering layer ``cfg.mid_layer``
            self.aux_head_mid = torch.nn.Linear(e, sum(AUX_CLASSES)).to(self.device)
            #: what the question asks to look for (query_targets), read at the answer position entering that layer
            self.query_head = torch.nn.Linear(e, sum(QUERY_CLASSES)).to(self.device)
        self.heads = {"aux_head": (self.aux_head, cfg.aux), "aux_head_lm": (self.aux_head_lm, cfg.aux_lm),
                      "aux_head_mid": (self.aux_head_mid, cfg.aux_mid), "query_head": (self.query_head, cfg.query_aux)}
        self.opt = make_optimizer(adapter.model, cfg)
        for head, weight in self.heads.values():
            if weight > 0:
                self.opt.add_param_group({"params": list(head.parameters()), "weight_decay": 0.0})
        self.step = 0
        self.samples = 0  # clips consumed by all ranks (the data position of a resumed run)
        dist = torch.distributed
        #: data-parallel ranks (torchrun): gradients are averaged over them before every optimiser step
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.history: list[dict[str, float]] = []

    def batch_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        adapter, cfg = self.adapter, self.cfg
        frames = batch["frames"].to(self.device, non_blocking=True)
        clip = batch["clip"].to(self.device)
        qb = encode_questions(adapter, batch["questions"], batch["answers"], self.device)
        opts = RegimeOptions(tuple(r for r in REGIMES if cfg.weights.get(r, 0) > 0), cfg.offset_prob, cfg.max_offset)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        use_amp = cfg.bf16 and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            # a frozen vision tower + projector runs without gradients (its backward is most of a step's cost)
            with torch.no_grad() if cfg.freeze_vision else contextlib.nullcontext():
                visual = encode(adapter, frames)
            hidden: dict[str, torch.Tensor] | None = {} if cfg.aux_lm > 0 and "labels" in batch else None
            sup = cfg.attn_sup > 0 and "evidence" in batch
            masses: dict[str, torch.Tensor] = {}
            evidence = batch["evidence"].reshape(clip.shape[0], -1).to(self.device) if sup else None
            want_mid = "full" in opts.regimes and ((cfg.aux_mid > 0 and "labels" in batch)
                                                   or (cfg.query_aux > 0 and "query_labels" in batch))
            ret = ({"spans": batch["spans"], "tau": cfg.retrieval_tau}
                   if cfg.retrieval > 0 and "mukv" in opts.regimes and "spans" in batch else None)
            with contextlib.ExitStack() as stack:
                mid = stack.enter_context(MidCapture(adapter, cfg.mid_layer)) if want_mid else None
                logits = memory_logits(adapter, self.levels, self.config, frames, clip, qb, opts, gen, visual,
                                       hidden, evidence, (tuple(cfg.attn_layers), cfg.attn_heads) if sup else None,
                                       masses, mid, ret)
            aux_logits = self.aux_head(visual) if cfg.aux > 0 and "labels" in batch else None
            lm_logits = {k: self.aux_head_lm(h) for k, h in hidden.items()} if hidden else {}
            if mid is not None and cfg.aux_mid > 0 and "labels" in batch:
                lm_logits["mid"] = self.aux_head_mid(mid.store["visual"])
            query_logits = (self.query_head(mid.store["answer"])
                            if mid is not None and cfg.query_aux > 0 and "query_labels" in batch else None)
        total = 0.0
        stats: dict[str, float] = {}
        # keep the visual tokens at the scale of the text embeddings (log-ratio of RMS, squared)
        rms_v = visual.float().pow(2).mean().sqrt()
        rms_t = adapter.language_model.embed_tokens.weight.float().pow(2).mean().sqrt().detach()
        ratio = torch.log(rms_v / rms_t)
        stats["rms_ratio"] = float(ratio.detach().exp())
        if cfg.vis_rms > 0:
            total = total + cfg.vis_rms * ratio.square()
        if aux_logits is not None or lm_logits:
            labels = batch["labels"].to(self.device)  # [B, F, 3, g, g]
            b, f = labels.shape[:2]
            labels = labels.reshape(b, f, 3, -1).permute(0, 1, 3, 2)  # [B, F, T, 3]

            def aux_loss(lg: torch.Tensor) -> torch.Tensor:
                parts = lg.float().reshape(b, f, -1, lg.shape[-1]).split(AUX_CLASSES, dim=-1)
                return sum(F.cross_entropy(pl.reshape(-1, pl.shape[-1]), labels[..., i].reshape(-1))
                           for i, pl in enumerate(parts)) / len(parts)

            if aux_logits is not None:
                aux = aux_loss(aux_logits)
                total = total + cfg.aux * aux
                stats["loss_aux"] = float(aux.detach())
            for k, lg in lm_logits.items():
                aux = aux_loss(lg)
                if k == "mid":
                    total = total + cfg.aux_mid * aux
                else:
                    total = total + cfg.aux_lm * aux / len([n for n in lm_logits if n != "mid"])
                stats[f"loss_aux_lm_{k}"] = float(aux.detach())
        if query_logits is not None:
            ql = batch["query_labels"].to(self.device)  # [Q, 3]
            parts = query_logits.float().split(QUERY_CLASSES, dim=-1)
            losses = [F.cross_entropy(pl, ql[:, i], ignore_index=-100) for i, pl in enumerate(parts)
                      if bool((ql[:, i] >= 0).any())]
            if losses:
                qloss = sum(losses) / len(losses)
                total = total + cfg.query_aux * qloss
                stats["loss_query"] = float(qloss.detach())
        if ret is not None and "loss" in ret:
            total = total + cfg.retrieval * ret["loss"]
            stats["loss_retrieval"] = float(ret["loss"].detach())
            stats.update(ret["stats"])
        for name, m in masses.items():
            # the designated heads must find the evidence: -log of the attention mass on it
            sup_loss = -torch.log(m.float() + 1e-4).mean()
            total = total + cfg.attn_sup * sup_loss / len(masses)
            stats[f"loss_attn_{name}"] = float(sup_loss.detach())
            stats[f"attn_mass_{name}"] = float(m.detach().float().mean())
        for name, lg in logits.items():
            loss, correct = loss_from_logits(lg, qb.targets)
            total = total + cfg.weights[name] * loss
            stats[f"loss_{name}"] = float(loss.detach())
            stats[f"acc_{name}"] = float(correct.float().mean())
        stats["questions"] = float(clip.shape[0])
        return total, stats

    def train_step(self, batch: dict[str, Any], lr: float | None = None) -> dict[str, float]:
        """One optimiser step; ``lr`` overrides the schedule's rate for this step."""
        cfg = self.cfg
        lr = cfg.lr_at(self.step) if lr is None else lr
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.adapter.model.train()
        loss, stats = self.batch_loss(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:
            self._average_gradients()
        gn = torch.nn.utils.clip_grad_norm_(self.adapter.model.parameters(), cfg.grad_clip)
        self.opt.step()
        stats.update(loss=float(loss.detach()), lr=lr, grad_norm=float(gn), step=self.step)
        self.step += 1
        self.samples += int(batch["frames"].shape[0]) * self.world
        return stats

    def _average_gradients(self) -> None:
        """Mean of every trainable parameter's gradient over the data-parallel ranks, in one
        flat all-reduce (a parameter without a gradient on this rank contributes zeros)."""
        params = [p for g in self.opt.param_groups for p in g["params"]]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = chunk.view_as(p).to(p.dtype)

    # -- checkpoints ------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Resumable checkpoint: float32 weights and bf16 Adam moments as safetensors
        files of at most 15 MB each, plus ``state.json`` (step, config, RNG states, history)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for old in path.glob("*.safetensors"):
            old.unlink()
        weights, seen = {}, set()
        for k, v in self.adapter.model.state_dict().items():
            if v.data_ptr() in seen:  # tied (lm_head = embeddings)
                continue
            seen.add(v.data_ptr())
            weights[k] = v.detach().float().cpu().clone().contiguous()
        _save_sharded(weights, path, "weights")
        names = {id(p): n for n, p in self.adapter.model.named_parameters()}
        moments: dict[str, dict[str, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
        steps = {}
        for group in self.opt.param_groups[:2]:
            for p in group["params"]:
                st = self.opt.state.get(p)
                if not st:
                    continue
                n = names[id(p)]
                for key in moments:
                    moments[key][n] = st[key].detach().to(torch.bfloat16).cpu().contiguous()
                steps[n] = float(st["step"])
        for name, (head, _) in self.heads.items():
            names.update({id(p): f"{name}.{n}" for n, p in head.named_parameters()})
        for group in self.opt.param_groups[2:]:
            for p in group["params"]:
                st = self.opt.state.get(p)
                if st:
                    for key in moments:
                        moments[key][names[id(p)]] = st[key].detach().to(torch.bfloat16).cpu().contiguous()
                    steps[names[id(p)]] = float(st["step"])
        for key, tensors in moments.items():
            _save_sharded(tensors, path, key)
        aux = {f"{name}.{k}": v for name, (head, _) in self.heads.items() for k, v in head.state_dict().items()}
        _save_sharded({k: v.detach().float().cpu().contiguous() for k, v in aux.items()}, path, "aux")
        rng = {"torch": torch.get_rng_state().tolist()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state().tolist()
        rng["numpy"] = list(np.random.get_state()[1][:8].tolist())
        state = {"step": self.step, "samples": self.samples, "train_config": asdict(self.cfg), "adam_steps": steps,
                 "history": self.history, "rng": rng, **(extra or {})}
        (path / "state.json").write_text(json.dumps(state))
        return path

    def load(self, path: str | Path) -> dict[str, Any]:
        """Restore weights, Adam moments, step and RNG state from :meth:`save`."""
        path = Path(path)
        state = json.loads((path / "state.json").read_text())
        weights = _load_sharded(path, "weights")
        missing, unexpected = self.adapter.model.load_state_dict(
            {k: v.to(self.device) for k, v in weights.items()}, strict=False)
        tied = {"lm_head.weight"} if self.adapter.model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
        moments = {key: _load_sharded(path, key) for key in ("exp_avg", "exp_avg_sq")}
        params = dict(self.adapter.model.named_parameters())
        if list(path.glob("aux-*.safetensors")):
            aux = _load_sharded(path, "aux")
            for prefix, head in ((name + ".", head) for name, (head, _) in self.heads.items()):
                own = {k[len(prefix):]: v.to(self.device) for k, v in aux.items() if k.startswith(prefix)}
                if not any(k.startswith(("aux_head.", "aux_head_lm.")) for k in aux):  # first format: one head
                    own = {k: v.to(self.device) for k, v in aux.items()} if prefix == "aux_head." else {}
                if own:
                    head.load_state_dict(own)
        for name, (head, _) in self.heads.items():
            params.update({f"{name}.{n}": p for n, p in head.named_parameters()})
        for n, s in state["adam_steps"].items():
            if n not in params:
                continue
            p = params[n]
            st = self.opt.state[p]
            st["step"] = torch.tensor(s, dtype=torch.float32, device=p.device if self.device.type == "cuda" else "cpu")
            st["exp_avg"] = moments["exp_avg"][n].to(p.device, torch.float32)
            st["exp_avg_sq"] = moments["exp_avg_sq"][n].to(p.device, torch.float32)
        self.step = int(state["step"])
        self.samples = int(state.get("samples", self.step * state["train_config"]["batch"]))
        self.history = state.get("history", [])
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.tensor(rng["cuda"], dtype=torch.uint8))
        return state


SHARD_BYTES = 15 * 2**20


def _save_sharded(tensors: dict[str, torch.Tensor], path: Path, stem: str, limit: int = SHARD_BYTES) -> list[Path]:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nbytes
    files = []
    for i, sh in enumerate(shards):
        f = path / f"{stem}-{i:02d}.safetensors"
        save_file(sh, str(f))
        files.append(f)
    return files


def _load_sharded(path: Path, stem: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob(f"{stem}-*.safetensors")):
        out.update(load_file(str(f)))
    if not out:
        raise FileNotFoundError(f"{path}: no {stem}-*.safetensors")
    return out


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(adapter, clips: Sequence[Any], config: MukvConfig | None = None, regimes: Sequence[str] = REGIMES,
             batch: int = 32) -> dict[str, dict[str, Any]]:
    """Per-kind accuracy of every regime on ``clips`` (objects with ``frames``,
    ``question``, ``answer``, ``kind``), batched through the training forward in
    eval mode. The prediction is the greedy first answer token, which is what
    :func:`mukv.bench.score` compares after ``HFVideoLLM.generate``.

    Returns ``{regime: accuracy_report}`` (see :func:`mukv.bench.accuracy_report`).
    """
    from mukv.bench import accuracy_report

    config = config or MukvConfig.build()
    levels = resolve_levels(adapter, config)
    was_training = adapter.model.training
    training_mode(adapter, True)
    adapter.model.eval()
    dev = adapter.device
    tok = adapter.tokenizer
    opts = RegimeOptions(tuple(regimes), 0.0, 0)
    rows: dict[str, list[dict[str, Any]]] = {r: [] for r in regimes}
    try:
        for i in range(0, len(clips), batch):
            part = clips[i : i + batch]
            frames = torch.from_numpy(np.stack([c.frames for c in part])).to(dev)
            clip = torch.arange(len(part), device=dev)
            qb = encode_questions(adapter, [c.question for c in part], None, dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                logits = memory_logits(adapter, levels, config, frames, clip, qb, opts)
            for name, lg in logits.items():
                pred = lg[:, 0].argmax(-1).tolist()
                for c, t in zip(part, pred):
                    rows[name].append({"kind": c.kind, "answer": c.answer,
                                       "prediction": tok.decode([t], skip_special_tokens=True).strip()})
    finally:
        training_mode(adapter, False)
        if was_training:
            adapter.model.train()
    return {name: accuracy_report(r) for name, r in rows.items()}


#: Where :func:`attention_report` looks: the question's evidence, the other objects of the
#: questioned scene, the objects of every other scene of the clip.
ATTENTION_TARGETS: tuple[str, ...] = ("evidence", "scene objects", "other objects")


def attention_report(adapter, clips: Sequence[Any], config: MukvConfig | None = None,
                     batch: int = 16) -> dict[str, dict[str, list[list[float]]]]:
    """Where the answer position looks, per question kind: the mean share of each
    head's attention (whole-clip regime, eval mode) on the question's evidence tokens
    (:func:`evidence_mask`), on the other object tokens of the questioned scene, and
    on the object tokens of the clip's other scenes. ``clips`` need ``scene`` (as
    :func:`mukv.bench.sample_clip` makes them).

    Returns ``{kind: {target: [[share per head] per layer]}}`` (targets:
    :data:`ATTENTION_TARGETS`). Heads that find the asked object put far more on
    ``"evidence"`` than its share of object tokens; heads that look at objects in
    general split their attention by token counts. A diagnostic for training."""
    config = config or MukvConfig.build()
    levels = resolve_levels(adapter, config)
    lm = adapter.language_model.config
    layers, heads = tuple(range(lm.num_hidden_layers)), lm.num_attention_heads
    g = adapter.grid[0]
    was_training = adapter.model.training
    training_mode(adapter, True)
    adapter.model.eval()
    dev = adapter.device
    sums: dict[str, dict[str, np.ndarray]] = {}
    counts: dict[str, int] = {}
    try:
        for i in range(0, len(clips), batch):
            part = clips[i : i + batch]
            n = part[0].frames.shape[0]
            masks = {t: [] for t in ATTENTION_TARGETS}
            for c in part:
                ev = evidence_mask(c.scene, c.evidence_start, n, g).reshape(-1)
                objects = token_labels(c.frames, g)[:, 1].reshape(-1) < 7
                in_scene = np.zeros((n, g * g), dtype=bool)
                in_scene[c.evidence_start : c.evidence_end] = True
                in_scene = in_scene.reshape(-1)
                masks["evidence"].append(ev)
                masks["scene objects"].append(objects & in_scene & ~ev)
                masks["other objects"].append(objects & ~in_scene)
            frames = torch.from_numpy(np.stack([c.frames for c in part])).to(dev)
            clip = torch.arange(len(part), device=dev)
            qb = encode_questions(adapter, [c.question for c in part], None, dev)
            for target, rows in masks.items():
                masses: dict[str, torch.Tensor] = {}
                with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    memory_logits(adapter, levels, config, frames, clip, qb, RegimeOptions(("full",), 0.0, 0),
                                  evidence=torch.from_numpy(np.stack(rows)), attn_heads=(layers, heads),
                                  masses=masses)
                m = masses["full"].float().cpu().numpy().reshape(len(part), len(layers), heads)
                for c, row in zip(part, m):
                    sums.setdefault(c.kind, {t: 0.0 for t in ATTENTION_TARGETS})[target] = \
                        sums.get(c.kind, {}).get(target, 0.0) + row
            for c in part:
                counts[c.kind] = counts.get(c.kind, 0) + 1
    finally:
        training_mode(adapter, False)
        if was_training:
            adapter.model.train()
    return {k: {t: (v[t] / counts[k]).round(4).tolist() for t in ATTENTION_TARGETS} for k, v in sums.items()}


def session_accuracy(adapter, clips: Sequence[Any], policy: str = "mukv", **session_kwargs: Any
                     ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-kind accuracy through mukv's real product path: for each clip a fresh
    :class:`mukv.Session` over ``adapter`` (memory backend, ``policy``), the clip's
    frames fed, the question asked, the answer scored with :func:`mukv.bench.score`."""
    import mukv
    from mukv.bench import accuracy_report, score

    rows = []
    for c in clips:
        with mukv.Session(model=adapter, backend="memory", policy=policy, **session_kwargs) as s:
            s.feed(c.frames)
            a = s.ask(c.question)
        rows.append({"kind": c.kind, "answer": c.answer, "prediction": a.text, "correct": score(a.text, c.answer),
                     "kv_tokens": a.kv_tokens})
    return accuracy_report(rows), rows


# ------------------------------------------------------------------------------ export
def export(adapter, path: str | Path, card: str | None = None, dtype: torch.dtype = torch.bfloat16,
           config: MukvConfig | None = None) -> Path:
    """Write a shippable checkpoint: ``config.json`` + ``model.safetensors`` in
    ``dtype`` + tokenizer files (``save_pretrained``) + ``MODEL_CARD.md``, and with
    ``config`` a ``mukv_config.json`` holding the levels the model was trained with (default:
    :func:`config_for`), which :class:`mukv.Session` applies when asked for none.
    :meth:`LlavaOnevisionAdapter.from_pretrained` loads it offline (upcast on CPU)."""
    import copy
    import json

    from .model import MODEL_DEFAULTS_FILE

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(adapter.model).to("cpu", dtype)
    model.save_pretrained(str(path), safe_serialization=True)
    adapter.tokenizer.save_pretrained(str(path))
    levels = (config or config_for(adapter)).model_dump(mode="json")["levels"]
    (path / MODEL_DEFAULTS_FILE).write_text(json.dumps({"config": {"levels": levels}}, indent=1) + "\n")
    if card is not None:
        (path / "MODEL_CARD.md").write_text(card)
    return path


def load_weights(adapter, path: str | Path) -> int:
    """Copy an exported checkpoint's weights (:func:`export`) into ``adapter``'s model of the same
    shape, in its dtype (loaded by transformers, offline, safetensors only). Returns how many tensors
    were copied.

    Raises:
        ValueError: a checkpoint of another shape (missing, unexpected or mis-shaped tensors).
    """
    from mukv.model import load_checkpoint

    loaded, _, _ = load_checkpoint(path, type(adapter.model), "cpu", torch.float32)
    state = loaded.state_dict()
    own = adapter.model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad:
        raise ValueError(f"{path}: not a checkpoint of this shape (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"other shapes {bad[:3]})")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))
    return len(state)


def directory_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def format_report(reports: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one row per kind (and level, and overall), one column per regime."""
    from mukv.bench import KINDS

    names = list(reports)
    head = "| kind | level | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names) + "\n"
    from mukv.bench import LEVELS

    lines = []
    for kind in KINDS:
        cells = []
        for n in names:
            k = reports[n]["by_kind"].get(kind)
            cells.append(f"{100 * k['accuracy']:.1f} ({k['correct']}/{k['n']})" if k else "-")
        lines.append(f"| {kind} | {LEVELS[kind]} | " + " | ".join(cells) + " |")
    for lvl in ("patch", "frame", "segment"):
        cells = []
        for n in names:
            k = reports[n]["by_level"].get(lvl)
            cells.append(f"{100 * k['accuracy']:.1f}" if k else "-")
        lines.append(f"| **{lvl}** | | " + " | ".join(cells) + " |")
    lines.append("| **overall** | | " + " | ".join(
        f"**{100 * reports[n]['overall']:.1f}** ({reports[n]['correct']}/{reports[n]['n']})" for n in names) + " |")
    return head + "\n".join(lines)


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
