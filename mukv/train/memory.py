"""MuKV's memory built differentiably for a batch of clips: every level's blocks
prefilled, scored and compressed with mukv's own plugins, MuKV's retrieval batched over
questions, the contrastive retrieval loss, and the context a question is answered from."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..blocks import PrefilledBlocks
from ..config import LevelConfig, MukvConfig
from .forward import KV, _cat_kv, prefill


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
    from ..interfaces import Compressor, GranularityExtractor, TokenScorer
    from ..registry import registry
    from ..specs import build

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
