"""Pictures of a session, as PNG: retrieval timelines, token importance, memory over time.

Each ``plot_*`` function draws one figure and writes it as a PNG to ``path``
(returning the path), or returns the PNG's bytes when ``path`` is ``None``::

    import mukv
    from mukv import plots

    answer = session.ask("what color was the circle?")
    plots.plot_retrieval_timeline(answer, "timeline.png", duration=session.stats()["last_time"])
    plots.plot_token_importance(session, frame, "tokens.png")   # frame: uint8 [H, W, 3]
    plots.plot_memory(trace, "memory.png")                     # trace: memory_snapshot() records

matplotlib is imported on first use only (``pip install "mukv[plots]"``);
figures are drawn with matplotlib's object API (no pyplot state), so plotting
is safe from any thread.
"""

from __future__ import annotations

import io
import logging
import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from .blocks import Answer, RetrievedBlock
from .errors import InputError, MukvError

if TYPE_CHECKING:  # pragma: no cover
    from .session import Session

__all__ = [
    "plot_retrieval_timeline",
    "plot_token_importance",
    "plot_memory",
    "token_importance",
    "TokenImportance",
    "memory_snapshot",
    "record_memory",
    "memory_history",
    "tier_bytes",
    "level_tiers",
    "MEMORY_HISTORY_KEY",
]

#: Store state key under which :func:`record_memory` keeps a stream's memory history.
MEMORY_HISTORY_KEY = "memory_history"
log = logging.getLogger(__name__)
#: Most records kept in a store's memory history (older ones are thinned out).
MAX_HISTORY = 2048

#: Level drawing order (coarse at the top) and colours for levels and tiers.
LEVEL_ORDER = ("segment", "frame", "patch")
TIER_COLORS = {"hot": "#d95f02", "disk": "#1b9e77"}
LEVEL_COLORS = {"segment": "#7570b3", "frame": "#1b9e77", "patch": "#d95f02"}


# ------------------------------------------------------------------------------ helpers
def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is in the plots extra
        raise MukvError("pictures need matplotlib: pip install 'mukv[plots]'") from None
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig, path: str | Path | None) -> Path | bytes:
    if path is None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    path = Path(path)
    try:
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    except OSError as exc:  # a folder that cannot be made or written, a path that is a folder
        raise InputError(f"cannot write the plot to {path}: {exc.strerror or exc}") from None
    return path


def _time_unit(duration: float) -> tuple[float, str]:
    """A divisor and unit name that suit a time axis of ``duration`` seconds."""
    if duration <= 180:
        return 1.0, "s"
    if duration <= 3 * 3600:
        return 60.0, "min"
    if duration <= 3 * 86400:
        return 3600.0, "h"
    return 86400.0, "days"


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def format_time(seconds: float) -> str:
    """Stream time as ``m:ss``, ``h:mm:ss`` or ``Nd h:mm:ss``."""
    seconds = max(0.0, float(seconds))
    d, rest = divmod(int(round(seconds)), 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    if d:
        return f"{d}d {h}:{m:02d}:{s:02d}"
    if h:
        return f"{h}:{m:02d}:{s:02d}"
    return f"{m}:{s:02d}"


# ------------------------------------------------------------------------------ timeline
def _frame_period(blocks: Sequence[RetrievedBlock]) -> float | None:
    """Seconds between frames, estimated from blocks that span several frames."""
    periods = [(b.t_end - b.t_start) / (b.frame_end - b.frame_start - 1)
               for b in blocks if b.frame_end - b.frame_start > 1 and b.t_end > b.t_start]
    if periods:
        return float(np.median(periods))
    starts = sorted({(b.frame_start, b.t_start) for b in blocks})
    steps = [(t1 - t0) / (f1 - f0) for (f0, t0), (f1, t1) in zip(starts, starts[1:]) if f1 > f0 and t1 > t0]
    return float(np.median(steps)) if steps else None


def plot_retrieval_timeline(
    answer: Answer | Sequence[RetrievedBlock],
    path: str | Path | None = None,
    duration: float | None = None,
    *,
    evidence: tuple[float, float] | None = None,
    title: str | None = None,
) -> Path | bytes:
    """Which segments, frames and patches answered a question, on the stream's time axis.

    One row per level (segments at the top, patches at the bottom; a frame's
    patches are stacked in its row). Each retrieved block is a bar over the
    stream time it covers, coloured by its retrieval score; the best three of
    each level are labelled with their score.

    Args:
        answer: what :meth:`mukv.Session.ask` returned (or its ``blocks``).
        path: where to write the PNG; ``None`` returns the PNG's bytes.
        duration: stream time (seconds) when the question was asked: the axis
            ends there. Default: the end of the latest retrieved block.
        evidence: optional ``(t_start, t_end)`` in seconds, shaded as the truth.
        title: a title; default the question and the answer.

    Returns:
        ``path`` as a :class:`~pathlib.Path`, or the PNG bytes.

    Raises:
        InputError: the answer holds no retrieved block.
    """
    if not isinstance(answer, (Answer, Iterable)) or isinstance(answer, (str, bytes, dict)):
        raise InputError(f"plot_retrieval_timeline takes an Answer (or its blocks); got {type(answer).__name__}")
    blocks = list(answer.blocks if isinstance(answer, Answer) else answer)
    if not all(isinstance(b, RetrievedBlock) for b in blocks):
        raise InputError("plot_retrieval_timeline: the blocks must be RetrievedBlock records (Answer.blocks)")
    if not blocks:
        raise InputError("the answer holds no retrieved block to plot")
    period = _frame_period(blocks)
    end = max(b.t_end for b in blocks) + (period or 0.0)
    duration = float(duration) if duration is not None else end
    duration = max(duration, end, 1e-6)
    div, unit = _time_unit(duration)
    min_width = duration / 250.0  # keep one-frame blocks visible on a long axis
    levels = [lv for lv in LEVEL_ORDER if any(b.level == lv for b in blocks)]
    levels += sorted({b.level for b in blocks} - set(levels))
    import matplotlib
    from matplotlib import cm, colors

    cmap = matplotlib.colormaps["viridis"]
    fig = _figure(11, 1.3 + 1.05 * len(levels))
    ax = fig.add_subplot()
    yticks, ylabels = [], []
    for row, level in enumerate(reversed(levels)):  # coarse levels drawn on top
        mine = [b for b in blocks if b.level == level]
        scores = np.array([b.score for b in mine], dtype=np.float64)
        lo, hi = float(scores.min()), float(scores.max())
        span = hi - lo if hi - lo > 1e-9 else 1.0
        # stack blocks that share a frame range (a frame's patches) in sub-rows
        slot: dict[int, int] = {}
        groups: dict[tuple[int, int], list[RetrievedBlock]] = {}
        for b in sorted(mine, key=lambda b: b.block_id):
            groups.setdefault((b.frame_start, b.frame_end), []).append(b)
        depth = max(len(g) for g in groups.values())
        for g in groups.values():
            for i, b in enumerate(g):
                slot[id(b)] = i
        h = 0.8 / depth
        for b in mine:
            width = max(b.t_end - b.t_start + (period or 0.0), min_width)
            y = row - 0.4 + slot[id(b)] * h
            ax.broken_barh([(b.t_start / div, width / div)], (y, h * 0.92), facecolors=cmap((b.score - lo) / span),
                           edgecolors="black", linewidth=0.4)
        best = max(mine, key=lambda b: b.score)
        ax.annotate(f"best {best.score:.3f}", (best.t_start / div, row + 0.4), xytext=(0, 2),
                    textcoords="offset points", fontsize=7.5, ha="center", va="bottom")
        tokens = sum(b.tokens for b in mine)
        yticks.append(row)
        ylabels.append(f"{level}\n{len(mine)} blocks, {tokens:,} tok\nscore {lo:.3f}-{hi:.3f}")
    if evidence is not None:
        ax.axvspan(evidence[0] / div, (evidence[1] + (period or 0.0)) / div, color="#e7298a", alpha=0.18,
                   label="evidence (truth)", zorder=0)
    ax.axvline(duration / div, color="#444444", linestyle="--", linewidth=1, label="question asked")
    ax.set_xlim(0, duration / div * 1.01)
    ax.set_ylim(-0.6, len(levels) - 0.3)
    ax.set_yticks(yticks, ylabels, fontsize=9)
    ax.set_xlabel(f"stream time ({unit})")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    sm = cm.ScalarMappable(norm=colors.Normalize(0, 1), cmap=cmap)
    bar = fig.colorbar(sm, ax=ax, pad=0.01, fraction=0.03)
    bar.set_ticks([0, 1], labels=["lowest", "highest"])
    bar.set_label("retrieval score within its level", fontsize=8)
    if title is None and isinstance(answer, Answer):
        q = textwrap.shorten(answer.question, 110)
        a = textwrap.shorten(answer.text or "(empty)", 40)
        title = f"Q: {q}\nA: {a}   ({answer.kv_tokens:,} KV tokens at answer time)"
    if title:
        ax.set_title(title, fontsize=9, loc="left")
    return _save(fig, path)


# ------------------------------------------------------------------------------ tokens
class TokenImportance:
    """Token scores of one frame at one level, laid out on the frame's token grid.

    Attributes:
        level: level name.
        grid: ``(h, w)`` visual tokens per frame.
        attention: ``[h, w]`` attention signal, min-max normalised per block.
        frequency: ``[h, w]`` frequency signal, min-max normalised per block.
        combined: ``[h, w]`` the level's scorer output, min-max normalised per block.
        kept: ``[h, w]`` bool, the tokens the level's compressor keeps.
        block: ``[h, w]`` int, which block of the level each token belongs to.
    """

    def __init__(self, level: str, grid: tuple[int, int], attention: np.ndarray, frequency: np.ndarray,
                 combined: np.ndarray, kept: np.ndarray, block: np.ndarray):
        self.level, self.grid = level, grid
        self.attention, self.frequency, self.combined = attention, frequency, combined
        self.kept, self.block = kept, block

    def __repr__(self) -> str:
        return f"TokenImportance(level={self.level!r}, grid={self.grid}, kept={int(self.kept.sum())}/{self.kept.size})"


def token_importance(session: "Session", frame: Any, levels: Iterable[str] | None = None) -> list[TokenImportance]:
    """Recompute the token scores of one frame, as ingest computes them.

    The frame is encoded and each single-frame level's blocks are prefilled
    after the session's system prompt, scored with the attention scorer, the
    configured frequency scorer and the level's own scorer, and compressed with
    the session's compressor: the kept tokens are the ones ingest keeps for this
    frame. Nothing is stored.

    Args:
        session: an open session.
        frame: ``uint8 [H, W, 3]`` (numpy or torch) RGB frame.
        levels: names of levels to compute (default: every level whose window
            is one frame, e.g. "patch" and "frame").

    Returns:
        One :class:`TokenImportance` per level.
    """
    import torch

    from .blocks import PrefilledBlocks
    from .frames import as_frames
    from .interfaces import TokenScorer, minmax
    from .registry import registry
    from .specs import build

    pixels = as_frames(frame)
    if pixels.shape[0] != 1:
        raise InputError(f"token_importance takes one frame [H, W, 3]; got {pixels.shape[0]} frames")
    model = session.model
    names = [lp.level.name for lp in session.levels]
    single = [lp for lp in session.levels if lp.level.frames == 1]
    if levels is not None:
        wanted = list(levels)
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise InputError(f"unknown levels {unknown}; levels: {names}")
        multi = [lp.level.name for lp in session.levels if lp.level.name in wanted and lp.level.frames != 1]
        if multi:
            raise InputError(f"levels {multi} span several frames; token importance is drawn for one-frame levels")
        single = [lp for lp in single if lp.level.name in wanted]
    if not single:
        raise InputError("the session has no level whose window is a single frame")
    reg = registry()
    cfg = session.config
    # the two signals of the dual score: the session's dual scorer's own, else the default ones
    dual = next((lp.scorer for lp in single if hasattr(lp.scorer, "attention") and hasattr(lp.scorer, "frequency")),
                None)
    attention = dual.attention if dual is not None else build("scorers", "attention", cfg, TokenScorer, "attention", reg)
    frequency = (dual.frequency if dual is not None
                 else build("scorers", "frequency_fft", cfg, TokenScorer, "frequency", reg))
    h, w = model.grid
    out = []
    with torch.inference_mode():
        embeds = model.encode_frames(pixels)[0]  # [T, E]
        for lp in single:
            split = lp.split.to(embeds.device)  # [n_blocks, L]
            b = split.shape[0]
            kv, att, positions = model.prefill_blocks(session.prefix, embeds[split], attention=True, token_index=split)
            blocks = PrefilledBlocks(
                level=lp.level, kv=kv, attention=att, token_index=split,
                frame_start=torch.zeros(b, dtype=torch.long), frame_end=torch.ones(b, dtype=torch.long),
                positions=positions.expand(b, -1), grid=model.grid,
            )
            a = minmax(attention.score(blocks))
            f = minmax(frequency.score(blocks))
            s = lp.scorer.score(blocks).float()
            kept = (torch.arange(lp.block_len, device=s.device).expand(b, -1) if lp.kept >= lp.block_len
                    else lp.compressor.select(blocks, s))
            s = minmax(s)

            def grid_of(x: torch.Tensor, fill: float = 0.0) -> np.ndarray:
                g = torch.full((h * w,), fill, dtype=torch.float32)
                g[split.reshape(-1).cpu()] = x.reshape(-1).float().cpu()
                return g.view(h, w).numpy()

            mask = torch.zeros(b, lp.block_len)
            mask.scatter_(1, kept.cpu(), 1.0)
            block_id = torch.arange(b).repeat_interleave(lp.block_len).float()
            out.append(TokenImportance(lp.level.name, (h, w), grid_of(a), grid_of(f), grid_of(s),
                                       grid_of(mask) > 0.5, grid_of(block_id).astype(np.int64)))
    return out


def _block_edges(ax, block: np.ndarray) -> None:
    """Draw white lines between grid cells that belong to different blocks."""
    h, w = block.shape
    for y in range(h):
        for x in range(w):
            if x + 1 < w and block[y, x] != block[y, x + 1]:
                ax.plot([x + 1, x + 1], [y, y + 1], color="white", linewidth=1.2)
            if y + 1 < h and block[y, x] != block[y + 1, x]:
                ax.plot([x, x + 1], [y + 1, y + 1], color="white", linewidth=1.2)


def plot_token_importance(
    session: "Session",
    frame: Any,
    path: str | Path | None = None,
    *,
    levels: Iterable[str] | None = None,
    title: str | None = None,
) -> Path | bytes:
    """A heat map of token importance over a frame, per one-frame level.

    Columns: the frame; the attention signal; the frequency signal; the
    combined score of the level's scorer with the kept tokens outlined; the
    frame with dropped tokens dimmed. Scores are min-max normalised within each
    block (as the dual score combines them); white lines separate the blocks of
    a level (e.g. the four patches of a frame).

    Args:
        session: an open session (its model, system prompt, scorers and compressor).
        frame: ``uint8 [H, W, 3]`` RGB frame.
        path: where to write the PNG; ``None`` returns the PNG's bytes.
        levels: levels to draw (default: every one-frame level).
        title: a title for the figure.

    Returns:
        ``path`` as a :class:`~pathlib.Path`, or the PNG bytes.
    """
    maps = token_importance(session, frame, levels)
    from matplotlib.patches import Rectangle

    img = np.asarray(frame.cpu() if hasattr(frame, "cpu") else frame)
    h, w = maps[0].grid
    fig = _figure(13, 0.6 + 2.75 * len(maps))
    axes = fig.subplots(len(maps), 5, squeeze=False)
    extent = (0, w, h, 0)
    for r, m in enumerate(maps):
        k, n = int(m.kept.sum()), m.kept.size
        panels = [
            ("frame", None),
            ("attention a", m.attention),
            ("frequency f", m.frequency),
            ("combined score, kept outlined", m.combined),
            (f"kept: {k} of {n} tokens", None),
        ]
        for c, (name, data) in enumerate(panels):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(name, fontsize=9)
            if data is None:
                ax.imshow(img, extent=extent, interpolation="nearest")
                if c == 4:
                    shade = np.zeros((h, w, 4))
                    shade[~m.kept] = (0, 0, 0, 0.78)
                    ax.imshow(shade, extent=extent, interpolation="nearest")
                    _block_edges(ax, m.block)
                continue
            im = ax.imshow(data, extent=extent, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            _block_edges(ax, m.block)
            if c == 3:
                ys, xs = np.nonzero(m.kept)
                for y, x in zip(ys, xs):
                    ax.add_patch(Rectangle((x + 0.06, y + 0.06), 0.88, 0.88, fill=False, edgecolor="#00e5ff",
                                           linewidth=1.4))
            if c == 3:
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        lv = session.config.level(m.level)
        axes[r][0].set_ylabel(f"{m.level} level\nkeep {lv.keep_ratio:g}, alpha {lv.alpha:g}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------------------ memory
def _session(session: Any, what: str) -> Any:
    """``session`` when it is a :class:`mukv.Session` (anything with a backend keeping state); else
    InputError."""
    backend = getattr(session, "backend", None)
    if not (callable(getattr(backend, "get_state", None)) and callable(getattr(session, "stats", None))):
        raise InputError(f"{what} takes a mukv.Session; got {type(session).__name__}")
    return session


def level_tiers(backend: Any) -> dict[str, dict[str, dict[str, int]]]:
    """Blocks, tokens and bytes per level and storage tier of a backend.

    Reads ``backend.stats()`` (per level ``{"blocks", "tokens", "bytes"}``, or
    already split per tier as ``{"hot": {...}, "disk": {...}}``) and, where the
    backend has one, ``backend.tier_stats()`` (blocks of each level held in the
    hot tier and committed to disk). A backend without tiers reports everything
    under "hot" (the memory backend: RAM or GPU memory) or "all".

    Returns:
        ``{level: {tier: {"blocks": n, "tokens": n, "bytes": n}}}``. Tiers can
        overlap: a block committed to disk may also be cached in the hot tier.
    """
    if not (callable(getattr(backend, "stats", None)) or isinstance(backend, dict)):
        raise InputError(f"expected a storage backend (session.backend) or its stats() dict; got {type(backend).__name__}")
    stats = backend.stats() if hasattr(backend, "stats") else dict(backend)
    tier_fn = getattr(backend, "tier_stats", None)
    ts = tier_fn() if callable(tier_fn) else {}
    hot = (ts.get("hot") or {}).get("blocks") if isinstance(ts.get("hot"), dict) else None
    disk = (ts.get("disk") or {}).get("committed") if isinstance(ts.get("disk"), dict) else None
    single = "hot" if getattr(backend, "name", "") == "memory" else "all"
    out: dict[str, dict[str, dict[str, int]]] = {}
    for level, v in stats.items():
        if not isinstance(v, dict):
            continue
        nested = {t: d for t, d in v.items() if isinstance(d, dict)}
        if nested:
            out[level] = {t: {k: int(d.get(k, 0)) for k in ("blocks", "tokens", "bytes")} for t, d in nested.items()}
            continue
        blocks, tokens, nbytes = int(v.get("blocks", 0)), int(v.get("tokens", 0)), int(v.get("bytes", 0))
        if isinstance(hot, dict) or isinstance(disk, dict):
            per_tok = tokens / blocks if blocks else 0.0
            per_byte = nbytes / blocks if blocks else 0.0
            out[level] = {}
            for tier, counts in (("hot", hot), ("disk", disk)):
                if isinstance(counts, dict):
                    n = int(counts.get(level, 0))
                    out[level][tier] = {"blocks": n, "tokens": int(round(n * per_tok)), "bytes": int(round(n * per_byte))}
        else:
            out[level] = {single: {"blocks": blocks, "tokens": tokens, "bytes": nbytes}}
    return out


def tier_bytes(backend: Any) -> dict[str, int]:
    """Bytes held per storage tier (summed over levels; see :func:`level_tiers`)."""
    out: dict[str, int] = {}
    for tiers in level_tiers(backend).values():
        for tier, v in tiers.items():
            out[tier] = out.get(tier, 0) + v["bytes"]
    return out


def memory_snapshot(session: "Session") -> dict[str, Any]:
    """Memory held by a session's store now.

    Returns:
        ``{"time": stream seconds, "frames": n, "tiers": {"hot": bytes, "disk": bytes, ...},
        "levels": {level: bytes}, "hot_budget": bytes or None}``, JSON-able.
    """
    _session(session, "memory_snapshot")
    stats = session.backend.stats()
    levels = {name: int(v.get("bytes", 0)) for name, v in stats.items()
              if isinstance(v, dict) and not any(isinstance(x, dict) for x in v.values())}
    tiers_by_level = level_tiers(session.backend)
    for name, tiers in tiers_by_level.items():
        levels.setdefault(name, max(t["bytes"] for t in tiers.values()) if tiers else 0)
    tiers: dict[str, int] = {}
    for per in tiers_by_level.values():
        for tier, v in per.items():
            tiers[tier] = tiers.get(tier, 0) + v["bytes"]
    budget = None
    tier_fn = getattr(session.backend, "tier_stats", None)
    if callable(tier_fn):
        budget = (tier_fn().get("hot") or {}).get("budget_bytes")
    st = session.stats()
    return {"time": float(st["last_time"] or 0.0), "frames": int(st["frames"]), "tiers": tiers,
            "levels": levels, "hot_budget": budget}


def memory_record_problem(rec: Any) -> str | None:
    """What is wrong with one memory record (as :func:`memory_snapshot` makes them), or ``None``:
    ``frames`` a count, ``time`` a finite number, ``tiers`` and ``levels`` maps of names to byte
    counts, ``hot_budget`` a byte count or null."""
    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(rec, dict):
        return f"not an object ({type(rec).__name__})"
    if not count(rec.get("frames")):
        return f"frames must be a count; got {rec.get('frames')!r}"[:160]
    t = rec.get("time")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        return f"time must be a finite number; got {t!r}"[:160]
    for key in ("tiers", "levels"):
        m = rec.get(key)
        if not isinstance(m, dict) or not all(isinstance(k, str) and count(v) for k, v in m.items()):
            return f"{key} must map names to byte counts; got {m!r}"[:160]
    if rec.get("hot_budget") is not None and not count(rec["hot_budget"]):
        return f"hot_budget must be a byte count or null; got {rec['hot_budget']!r}"[:160]
    return None


def memory_history(session: "Session") -> list[dict[str, Any]]:
    """The memory records kept in a session's store by :func:`record_memory`. Records the store holds
    that are not memory records (a damaged state file; :func:`memory_record_problem`) are left out, each
    with a warning naming it."""
    _session(session, "memory_history")
    raw = session.backend.get_state(MEMORY_HISTORY_KEY, None)
    if raw is None:
        return []
    if not isinstance(raw, list):
        log.warning("stream %r: its memory history is not a list (%s); ignored", session.stream_id,
                    type(raw).__name__)
        return []
    out = []
    for i, rec in enumerate(raw):
        why = memory_record_problem(rec)
        if why:
            log.warning("stream %r: memory record %d left out: %s", session.stream_id, i, why)
        else:
            out.append(rec)
    return out


def record_memory(session: "Session") -> dict[str, Any]:
    """Append a :func:`memory_snapshot` to the history kept in the session's store.

    ``mukv ingest`` calls this after every chunk, so ``mukv inspect --plot``
    can draw a stored stream's memory over time. At most :data:`MAX_HISTORY`
    records are kept (every other old record is dropped when full).
    """
    _session(session, "record_memory")
    snap = memory_snapshot(session)
    history = memory_history(session)
    if history and history[-1].get("frames") == snap["frames"]:
        history[-1] = snap
    else:
        history.append(snap)
    if len(history) > MAX_HISTORY:
        history = history[: -1 : 2] + history[-1:]
    session.backend.set_state(MEMORY_HISTORY_KEY, history)
    return snap


def plot_memory(
    records: "Sequence[dict[str, Any]] | Session",
    path: str | Path | None = None,
    *,
    title: str | None = None,
) -> Path | bytes:
    """Memory of a store over stream time: bytes per tier (hot, disk) and per level.

    The top panel draws each tier's bytes (and the hot tier's budget, when the
    backend has one); tiers can overlap, since the hot tier caches blocks that
    are also on disk. The bottom panel draws each level's bytes over all tiers.

    Args:
        records: :func:`memory_snapshot` records in stream order, or a session
            whose store holds a history written by :func:`record_memory`
            (``mukv ingest`` writes one).
        path: where to write the PNG; ``None`` returns the PNG's bytes.
        title: a title; default "memory over stream time".

    Returns:
        ``path`` as a :class:`~pathlib.Path`, or the PNG bytes.

    Raises:
        InputError: no records, or a record that is not a memory record (:func:`memory_record_problem`).
    """
    if not isinstance(records, (list, tuple)):
        records = memory_history(_session(records, "plot_memory"))
    for i, r in enumerate(records):
        why = memory_record_problem(r)
        if why:
            raise InputError(f"plot_memory: record {i}: {why}")
    if not records:
        raise InputError("no memory records to plot (record them with mukv.plots.record_memory or mukv ingest)")
    if float(records[0].get("time", 0.0)) > 0:  # start the curves at an empty store
        records = [{"time": 0.0, "frames": 0, "tiers": {k: 0 for k in records[0].get("tiers", {})},
                    "levels": {k: 0 for k in records[0].get("levels", {})}}, *records]
    t = np.array([float(r.get("time", 0.0)) for r in records])
    tiers = sorted({k for r in records for k in r.get("tiers", {})}, key=lambda k: (k != "hot", k != "disk", k))
    levels = [lv for lv in LEVEL_ORDER if any(lv in r.get("levels", {}) for r in records)]
    levels += sorted({k for r in records for k in r.get("levels", {})} - set(levels))
    div, unit = _time_unit(max(float(t.max()), 1.0))
    peak = max(max([*r.get("tiers", {}).values(), 0]) for r in records)
    peak = max(peak, max((r.get("hot_budget") or 0) for r in records), 1)
    exp = min(4, max(0, int(math.log(peak, 1024))))
    scale, bunit = 1024.0**exp, ("B", "KiB", "MiB", "GiB", "TiB")[exp]
    fig = _figure(10, 6.2)
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = t / div
    series = {k: np.array([r.get("tiers", {}).get(k, 0) for r in records], dtype=np.float64) / scale for k in tiers}
    budget = next((r.get("hot_budget") for r in reversed(records) if r.get("hot_budget")), None)
    if len(x) == 1:  # one record: draw it as a short step so it is visible
        x = np.array([0.0, x[0] if x[0] > 0 else 1.0])
        series = {k: np.repeat(v, 2) for k, v in series.items()}
    for k, y in series.items():
        color = TIER_COLORS.get(k, "#666666")
        top.plot(x, y, color=color, linewidth=2, label=f"{k} tier")
        top.fill_between(x, y, color=color, alpha=0.15)
    if budget:
        top.axhline(budget / scale, color=TIER_COLORS["hot"], linestyle=":", linewidth=1.2,
                    label=f"hot budget ({format_bytes(budget)})")
    last = records[-1].get("tiers", {})
    top.set_ylabel(f"bytes held ({bunit})")
    top.legend(loc="upper left", fontsize=9)
    top.grid(alpha=0.3)
    summary = ", ".join(f"{k} {format_bytes(last.get(k, 0))}" for k in tiers)
    top.set_title(title or f"memory over stream time (now: {summary}; {records[-1].get('frames', 0):,} frames)",
                  fontsize=10, loc="left")
    for lv in levels:
        y = np.array([r.get("levels", {}).get(lv, 0) for r in records], dtype=np.float64) / scale
        if len(y) == 1:
            y = np.repeat(y, 2)
        bottom.plot(x, y, label=lv, color=LEVEL_COLORS.get(lv), linewidth=1.8)
    bottom.set_ylabel(f"per level, all tiers ({bunit})")
    bottom.set_xlabel(f"stream time ({unit})")
    bottom.legend(loc="upper left", fontsize=9)
    bottom.grid(alpha=0.3)
    bottom.set_xlim(left=0)
    return _save(fig, path)
