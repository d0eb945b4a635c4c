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

Where the code lives (``mukv.train`` re-exports every name of these modules):

``mukv/train/build.py``
    the shapes (:data:`SHAPES`), :func:`toy_config`, :func:`config_for`, :func:`build_model`,
    the projector calibration, :func:`count_parameters`.
``mukv/train/data.py``
    training clips and their training-only targets, :class:`TrainingClips`, :func:`eval_clips`,
    :func:`collate`, :func:`iterate_batches`.
``mukv/train/forward.py``
    the "mukv_train" attention, :class:`EvidenceAttention`, :class:`MidCapture`,
    :func:`training_mode`, and the forward pieces (:func:`encode`, :func:`prefix_kv`,
    :func:`prefill`, :func:`answer_logits`, :func:`query_vectors`).
``mukv/train/memory.py``
    MuKV's memory built differentiably (:func:`resolve_levels`, :func:`level_memory`),
    :func:`retrieve`, :func:`retrieval_loss`, :func:`mukv_context`.
``mukv/train/regimes.py``
    :data:`REGIMES`, :func:`encode_questions`, :func:`memory_logits` (one step's logits in
    every regime), :func:`loss_from_logits`.
``mukv/train/trainer.py``
    :class:`TrainConfig`, :func:`make_optimizer`, :class:`Trainer` (batch loss, optimiser step).
``mukv/train/checkpoint.py``
    the trainer's resumable checkpoints (sharded safetensors + ``state.json``).
``mukv/train/evaluation.py``
    :func:`evaluate`, :func:`attention_report`, :func:`session_accuracy`, :func:`format_report`.
``mukv/train/shipping.py``
    :func:`export` (the shippable checkpoint), :func:`load_weights`, :func:`directory_bytes`.

Rebinding a name of ``mukv.train`` (``monkeypatch.setattr(mukv.train, "encode", f)``) rebinds
it in the modules above that use it, as when ``mukv.train`` was one module.
"""

from __future__ import annotations

import sys
import types

# The standard-library, third-party and mukv names that mukv.train has always exposed.
import contextlib  # noqa: F401
import json  # noqa: F401
import math  # noqa: F401
import threading  # noqa: F401
from dataclasses import asdict, dataclass, field  # noqa: F401
from pathlib import Path  # noqa: F401
from typing import Any, Iterator, Sequence  # noqa: F401

import numpy as np  # noqa: F401
import torch  # noqa: F401
import torch.nn.functional as F  # noqa: F401

from ..blocks import PrefilledBlocks  # noqa: F401
from ..config import LevelConfig, MukvConfig  # noqa: F401
from . import build, checkpoint, data, evaluation, forward, memory, regimes, shipping, trainer
from .build import (MEDIUM_196_SHAPE, MEDIUM_SHAPE, MUKV_TINY_SHAPE, SHAPES, SMALL_196_SHAPE, SMALL_SHAPE,  # noqa: F401
                    TOY_SHAPE, build_model, calibrate_projector, config_for, count_parameters, toy_config,
                    visual_text_rms)
from .checkpoint import SHARD_BYTES, _load_sharded, _save_sharded  # noqa: F401
from .data import (AUX_CLASSES, QUERY_CLASSES, TAG_EVAL, TAG_TRAIN, TrainingClip, TrainingClips,  # noqa: F401
                   _filler_length, _filler_scene, collate, eval_clips, evidence_mask, extra_questions,
                   iterate_batches, query_targets, sample_training_clip, token_labels)
from .evaluation import ATTENTION_TARGETS, attention_report, evaluate, format_report, session_accuracy  # noqa: F401
from .forward import (KV, TRAIN_ATTN_IMPL, EvidenceAttention, MidCapture, _cache, _cat_kv, _ours,  # noqa: F401
                      _state, _take, answer_logits, encode, prefill, prefix_kv, query_vectors,
                      register_train_attention, training_mode)
from .memory import (LevelMemory, _Level, level_memory, mukv_context, resolve_levels, retrieval_loss,  # noqa: F401
                     retrieve)
from .regimes import (REGIMES, QuestionBatch, RegimeOptions, encode_questions, loss_from_logits,  # noqa: F401
                      memory_logits)
from .shipping import directory_bytes, export, load_weights  # noqa: F401
from .trainer import TrainConfig, Trainer, make_optimizer  # noqa: F401

#: The modules that hold mukv.train's code.
_PARTS: tuple[types.ModuleType, ...] = (build, data, forward, memory, regimes, trainer, checkpoint, evaluation,
                                        shipping)

#: Module state that changes at run time: read from (and set on) its owner, never copied here.
_LIVE: dict[str, types.ModuleType] = {"_train_registered": forward}

_ABSENT = object()


def __getattr__(name: str) -> Any:
    if name in _LIVE:
        return getattr(_LIVE[name], name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Namespace(types.ModuleType):
    """``mukv.train`` as one namespace over its modules: a name rebound here is rebound in every
    module of :data:`_PARTS` that holds the same object (a function, a class, a constant, an
    imported module), so the code that uses it sees the new one; a name of :data:`_LIVE` is set on
    its owner only."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LIVE:
            setattr(_LIVE[name], name, value)
            return
        old = self.__dict__.get(name, _ABSENT)
        if old is not _ABSENT and not name.startswith("__"):
            for part in _PARTS:
                if vars(part).get(name, _ABSENT) is old:
                    setattr(part, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Namespace
