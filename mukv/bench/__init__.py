"""A procedurally generated benchmark for long streaming video question answering.

Streams of any length are rendered lazily from a seed: frame ``i`` of a
week-long stream costs the same as frame 0. Each stream is a sequence of short
scenes of coloured shapes (objects appear, move, blink, change colour, grow,
shrink and leave); a few of them are *needles* that questions are asked about,
minutes to days later. Questions name their scene by a key pair of objects that
occurs nowhere else in the stream, and their single-word answers need evidence
at one of three granularities: a patch (a small mark or dot), a frame (an
object's colour, shape or place) or a segment (motion, counts, changes, what
happened next).

Typical use::

    from mukv.bench import Benchmark, score, accuracy_report

    bench = Benchmark.generate(seed=0, minutes=1000, questions=100)
    bench.save("bench.json")
    stream = bench.stream
    for start, frames in stream.iter_frames(batch=256):   # uint8 [b, 64, 64, 3]
        ...                                               # feed the memory
    results = [(q, my_model.answer(q.text)) for q in bench.questions]
    print(accuracy_report(results))

Training data for a small Video-LLM comes from :func:`sample_clip` /
:func:`iter_clips`: short clips holding one questioned scene among distractors.
"""

from .dataset import Benchmark, Clip, ClipDataset, clip_at, iter_clips, sample_clip
from .oracle import Percept, SeenObject, parse, perceive, solve
from .questions import (
    DEPTH_BUCKETS,
    VOCABULARY,
    Question,
    accuracy_report,
    answer_space,
    normalize,
    pose,
    score,
    tokenize,
)
from .scene import COLORS, CORNERS, KINDS, LEVELS, SHAPES, Scene, SceneObject, make_scene
from .render import render_scene, render_state
from .stream import MAX_QUESTIONS, Episode, Stream, StreamSpec

__all__ = [
    "Benchmark",
    "Clip",
    "ClipDataset",
    "clip_at",
    "iter_clips",
    "sample_clip",
    "Stream",
    "StreamSpec",
    "Episode",
    "MAX_QUESTIONS",
    "Question",
    "VOCABULARY",
    "DEPTH_BUCKETS",
    "accuracy_report",
    "answer_space",
    "normalize",
    "pose",
    "score",
    "tokenize",
    "KINDS",
    "LEVELS",
    "COLORS",
    "SHAPES",
    "CORNERS",
    "Scene",
    "SceneObject",
    "make_scene",
    "render_scene",
    "render_state",
    "Percept",
    "SeenObject",
    "perceive",
    "parse",
    "solve",
]
