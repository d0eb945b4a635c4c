"""Evaluation of a trained model: per-kind accuracy of every regime through the training
forward, where the answer position looks, accuracy through mukv's real product path
(:class:`mukv.Session`), and the markdown table of a report."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..config import MukvConfig
from .data import evidence_mask, token_labels
from .forward import training_mode
from .memory import resolve_levels
from .regimes import REGIMES, RegimeOptions, encode_questions, memory_logits


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
