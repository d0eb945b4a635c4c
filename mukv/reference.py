"""The reference mode: MuKV's authors' execution path, kept as a measuring baseline.

**Not a user path.** Nothing in a :class:`~mukv.Session` calls this module. It
exists so that mukv's fast path can be timed against, and checked against, the
way the method's own implementation runs, on the same weights in the same
process (``benchmarks/gpu_bench.py``, ``tests/test_reference.py``,
``tests/gpu/``). It computes the same things as the fast path (kept token
indices, block vectors, stored KV, retrieved blocks, greedy answers) the slow
way, step by step as the authors do:

Ingest (:class:`ReferenceIngestor`)
    * one forward pass per block (batch of one), level after level;
    * eager attention in every layer of the model (the vision tower too), with
      ``output_attentions=True``: every layer's weights ``[1, Hq, L, P + L]``
      are materialised, and only the last layer's are used;
    * the system prompt's KV copied into a fresh cache for every block;
    * attention column sums from the last layer's weights (averaged over
      heads, summed over queries, system-prompt columns dropped), then the
      level's scorer and compressor on that one block;
    * every kept layer's keys and values copied to the host one tensor at a
      time (``.cpu()``: synchronous, into pageable memory), and the vector,
      kept indices and positions likewise, into Python lists.

Questions (:meth:`ReferenceIngestor.ask`)
    * the query vector with eager attention;
    * per level, every block vector stacked from the host lists and uploaded
      again, then scanned (cosine similarity against all);
    * the over-retrieved candidates' KV (2x top-k) copied to the device block
      by block and layer by layer *before* the rerank discards half of it;
    * segment-guided rerank, assembly by level and score, greedy decoding with
      eager attention and a cache that grows by concatenation every step.

The scorers, compressors, configuration and position codes (1D RoPE, or
Qwen-VL's M-RoPE through the adapter's ``block_positions``) are the session's
own, so a difference between the two paths is a difference of execution, not
of method.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .blocks import PrefilledBlocks
from .config import MukvConfig
from .model import HFVideoLLM, PrefixKV
from .pipeline import LevelPipeline

__all__ = ["ReferenceIngestor", "ReferenceStore", "ReferenceAnswer", "eager_attention"]


@contextmanager
def eager_attention(model: HFVideoLLM) -> Iterator[None]:
    """Run ``model`` with transformers' eager attention in every layer (vision tower
    included), as the authors load it; restore the previous implementation after."""
    hf = model.model
    saved = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        hf.set_attn_implementation(saved)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dynamic_cache(kv: torch.Tensor):
    """A plain ``DynamicCache`` from ``[Y, 2, B, H, S, D]`` (copies, grows by concatenation)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(kv[y, 0], kv[y, 1]) for y in range(kv.shape[0])])


@dataclass
class _Level:
    kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)  # per block, per layer (K, V) [H, K, D]
    vectors: list[torch.Tensor] = field(default_factory=list)  # [V] float32
    kept: list[torch.Tensor] = field(default_factory=list)  # [K]
    scores: list[torch.Tensor] = field(default_factory=list)  # [L] float32 (the block's token scores)
    positions: list[torch.Tensor] = field(default_factory=list)  # [K] position codes (see mukv.rope)
    token_index: list[torch.Tensor] = field(default_factory=list)  # [K]
    frame_start: list[int] = field(default_factory=list)
    frame_end: list[int] = field(default_factory=list)
    t_start: list[float] = field(default_factory=list)
    t_end: list[float] = field(default_factory=list)


class ReferenceStore:
    """Blocks as the authors keep them: per level, Python lists of per-block host tensors.

    Accessors stack the lists into the fast backend's shapes so that tests can
    compare the two paths.
    """

    def __init__(self) -> None:
        self.levels: dict[str, _Level] = {}

    def level(self, name: str) -> _Level:
        return self.levels.setdefault(name, _Level())

    def count(self, level: str) -> int:
        st = self.levels.get(level)
        return 0 if st is None else len(st.vectors)

    def kept(self, level: str) -> torch.Tensor:
        """``[N, K]`` kept token indices inside each block, ascending."""
        return torch.stack(self.level(level).kept)

    def token_scores(self, level: str) -> torch.Tensor:
        """``[N, L]`` token scores each block was compressed with (empty rows where nothing was dropped)."""
        return torch.stack(self.level(level).scores)

    def vectors(self, level: str) -> torch.Tensor:
        """``[N, V]`` block vectors (float32)."""
        return torch.stack(self.level(level).vectors)

    def token_index(self, level: str) -> torch.Tensor:
        """``[N, K]`` kept tokens' index inside their window."""
        return torch.stack(self.level(level).token_index)

    def positions(self, level: str) -> torch.Tensor:
        """``[N, K]`` RoPE positions of the kept keys."""
        return torch.stack(self.level(level).positions)

    def kv(self, level: str, ids: Any = None) -> torch.Tensor:
        """``[n, Y, 2, H, K, D]`` stored KV of blocks ``ids`` (default all)."""
        st = self.level(level)
        rows = range(len(st.kv)) if ids is None else [int(i) for i in ids]
        return torch.stack([torch.stack([torch.stack(kv) for kv in st.kv[i]]) for i in rows])

    def nbytes(self) -> int:
        """Bytes of KV held."""
        return sum(k.numel() * k.element_size() * 2 for st in self.levels.values() for blk in st.kv for k, _ in blk)

    @classmethod
    def from_backend(cls, backend: Any, levels: list[str], dtype: torch.dtype | None = None) -> "ReferenceStore":
        """A reference store holding what a fast backend holds, in the authors' layout
        (used to time the reference question path on a long stream without
        ingesting it the slow way). Copies block by block; not timed."""
        store = cls()
        for name in levels:
            n = backend.count(name)
            if n == 0:
                continue
            st = store.level(name)
            ids = torch.arange(n)
            vecs = backend.vectors(name, ids).float().cpu()
            meta = backend.metadata(name, ids)
            pos = backend.positions(name, ids).cpu()
            for i in range(n):
                kv = backend.load_kv(name, ids[i : i + 1])[0].cpu()  # [Y, 2, H, K, D]
                if dtype is not None:
                    kv = kv.to(dtype)
                st.kv.append([(kv[y, 0], kv[y, 1]) for y in range(kv.shape[0])])
                st.vectors.append(vecs[i])
                st.positions.append(pos[i])
                st.frame_start.append(int(meta.frame_start[i]))
                st.frame_end.append(int(meta.frame_end[i]))
                st.t_start.append(float(meta.t_start[i]))
                st.t_end.append(float(meta.t_end[i]))
        return store


@dataclass
class ReferenceAnswer:
    """What :meth:`ReferenceIngestor.ask` returns.

    Attributes:
        text: the decoded answer.
        tokens: the greedy answer token ids.
        margins: per answer token, the top-1 minus top-2 logit (to tell ties apart).
        blocks: ``(level, block id, score)`` in assembled order.
        kv_tokens: KV tokens in the answer context.
        timings: seconds per stage ("query", "retrieve", "page_in", "prefill",
            "first_token", "generate", "total"), each ending with a synchronisation.
    """

    text: str
    tokens: list[int]
    margins: list[float]
    blocks: list[tuple[str, int, float]]
    kv_tokens: int
    timings: dict[str, float]


class ReferenceIngestor:
    """The authors' path over a model, prefix and levels shared with a fast session.

    Args:
        model: the model adapter (its weights are shared with the fast path).
        prefix: the system prompt's KV.
        levels: resolved levels (extractor split, scorer, compressor).
        config: the session configuration.
        store: where blocks go (a new :class:`ReferenceStore` by default).
    """

    def __init__(self, model: HFVideoLLM, prefix: PrefixKV, levels: list[LevelPipeline], config: MukvConfig,
                 store: ReferenceStore | None = None):
        self.model = model
        self.prefix = PrefixKV(prefix.kv.contiguous(), prefix.token_ids)
        self.levels = levels
        self.config = config
        self.store = store if store is not None else ReferenceStore()
        self.frames_seen = 0
        self.cursor = {lp.level.name: 0 for lp in levels}
        self._frames: list[torch.Tensor] = []  # encoded frames [T, E], all kept (the authors keep the chunk)
        self._times: list[float] = []

    @classmethod
    def from_session(cls, session: Any, store: ReferenceStore | None = None) -> "ReferenceIngestor":
        """A reference path over a :class:`~mukv.Session`'s model, prefix, levels and configuration."""
        return cls(session.model, session.prefix, session.levels, session.config, store)

    # -- ingest ---------------------------------------------------------------------------
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames -> ``[n, T, E]`` with eager attention in the vision tower, in the session's batches."""
        bs = self.config.stream.encode_batch_frames
        with eager_attention(self.model):
            return torch.cat([self.model.encode_frames(frames[i : i + bs]) for i in range(0, frames.shape[0], bs)])

    def feed(self, frames: torch.Tensor, times: torch.Tensor | None = None) -> int:
        """Encode ``uint8 [n, H, W, 3]`` frames and store every block they complete."""
        return self.add_frames(self.encode(frames), times)

    @torch.inference_mode()
    def add_frames(self, embeds: torch.Tensor, times: torch.Tensor | None = None) -> int:
        """Append encoded frames ``[n, T, E]`` and store every block they complete,
        one forward pass per block. Returns the number of blocks stored."""
        n = embeds.shape[0]
        if times is None:
            step = 1.0 / self.config.stream.fps
            times = torch.arange(self.frames_seen, self.frames_seen + n, dtype=torch.float64) * step
        self._frames.extend(embeds.unbind(0))
        self._times.extend(float(t) for t in times)
        self.frames_seen += n
        stored = 0
        with eager_attention(self.model):
            for lp in self.levels:
                stored += self._run_level(lp)
        return stored

    def _run_level(self, lp: LevelPipeline) -> int:
        name, frames = lp.level.name, lp.level.frames
        stored = 0
        while self.frames_seen - self.cursor[name] >= frames:
            first = self.cursor[name]
            window = torch.cat(self._frames[first : first + frames])  # [F * T, E]
            for j in range(lp.split.shape[0]):
                self._one_block(lp, window, j, first)
                stored += 1
            self.cursor[name] = first + frames
        return stored

    def _one_block(self, lp: LevelPipeline, window: torch.Tensor, j: int, first: int) -> None:
        model, prefix = self.model, self.prefix
        split = lp.split[j]
        rows = window[split.to(window.device)][None]  # [1, L, E']
        emb, extra = model.block_inputs(rows)  # [1, L, E] (+ Qwen3-VL's DeepStack features)
        emb = emb.to(model.dtype)
        length, p = emb.shape[1], prefix.length
        # the model's own position codes ([1, L]): 1D RoPE P .. P + L - 1, M-RoPE codes for Qwen-VL
        positions = model.block_positions(p, split[None].to(model.device)).expand(1, -1)
        cache = _dynamic_cache(prefix.kv)
        out = model.language_model(inputs_embeds=emb, past_key_values=cache,
                                   position_ids=model.position_ids(positions), use_cache=True,
                                   output_attentions=True, **extra)
        weights = out.attentions[-1]  # [1, Hq, L, P + L], eager, model dtype
        colsum = weights[0].float().mean(dim=0).sum(dim=0)[p:]  # averaged over heads, summed over queries
        kv = torch.stack([torch.stack((layer.keys, layer.values)) for layer in cache.layers])[..., p:, :]
        frames = lp.level.frames
        blocks = PrefilledBlocks(
            level=lp.level, kv=kv, attention=colsum[None], token_index=split[None],
            frame_start=torch.tensor([first]), frame_end=torch.tensor([first + frames]),
            positions=positions, grid=model.grid,
        )
        if lp.kept >= length:
            kept = torch.arange(length, device=model.device)
            scores = torch.zeros(length)
        else:
            score_t = lp.scorer.score(blocks)
            kept = lp.compressor.select(blocks, score_t)[0].to(model.device)
            scores = score_t[0].float().cpu()
        st = self.store.level(lp.level.name)
        layers = []
        for y in range(kv.shape[0]):  # one synchronous copy per tensor, into pageable memory
            layers.append((kv[y, 0, 0][:, kept].cpu(), kv[y, 1, 0][:, kept].cpu()))
        st.kv.append(layers)
        st.vectors.append(kv[-1, 0, 0][:, kept].float().mean(dim=1).reshape(-1).cpu())
        st.kept.append(kept.cpu())
        st.scores.append(scores)
        st.positions.append(positions[0, kept].cpu())
        st.token_index.append(split[kept.cpu()])
        st.frame_start.append(first)
        st.frame_end.append(first + frames)
        st.t_start.append(self._times[first])
        st.t_end.append(self._times[first + frames - 1])

    # -- questions ------------------------------------------------------------------------
    @torch.inference_mode()
    def query_vector(self, question: str) -> torch.Tensor:
        """``[V]`` last-layer key of the question's final token (eager attention)."""
        model = self.model
        ids = model.tokenize(model.query_template.format(question=question))
        cache = _dynamic_cache(self.prefix.kv)
        p = self.prefix.length
        with eager_attention(model):
            model.language_model(input_ids=ids[None], past_key_values=cache,
                                 position_ids=torch.arange(p, p + ids.numel(), device=model.device)[None],
                                 use_cache=True)
        return cache.layers[-1].keys[0, :, -1, :].reshape(-1).float()

    def plan(self, top_k: dict[str, int] | None = None) -> dict[str, int]:
        """Final top-k per level, clamped to what is stored (as ``Session.ask`` does)."""
        out = {}
        for lp in self.levels:
            name = lp.level.name
            k = lp.level.top_k if top_k is None or name not in top_k else top_k[name]
            out[name] = min(k, self.store.count(name))
        return out

    @torch.inference_mode()
    def ask(self, question: str, top_k: dict[str, int] | None = None, max_new_tokens: int | None = None,
            stop: bool = True, vector: torch.Tensor | None = None) -> ReferenceAnswer:
        """Answer the authors' way (see the module docstring).

        Args:
            question: the question.
            top_k: per-level final top-k overrides.
            max_new_tokens: decoding budget (default ``config.generation.max_new_tokens``).
            stop: end at the model's stop tokens (``False``: always decode the budget).
            vector: use this ``[V]`` query vector instead of computing one (to
                compare retrieval alone against the fast path's, from one query).
        """
        model, cfg, dev = self.model, self.config, self.model.device
        timings: dict[str, float] = {}
        _sync(dev)
        t_start = t0 = time.perf_counter()
        q = self.query_vector(question) if vector is None else vector.to(dev, torch.float32)
        _sync(dev)
        timings["query"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        plan = self.plan(top_k)
        over = cfg.retrieval.over_retrieval
        guide = cfg.retrieval.guide_level
        weights = {lv.name: lv.rerank_weight for lv in cfg.levels}
        cands: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        cand_kv: dict[str, list[list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        for name, k in plan.items():
            if k <= 0:
                continue
            st = self.store.level(name)
            vecs = torch.stack(st.vectors).to(dev)  # every vector uploaded again, every question
            sims = F.cosine_similarity(vecs, q[None], dim=-1)  # scan them all
            scores, ids = sims.topk(min(math.ceil(k * over), len(st.vectors)))
            cands[name] = (ids, scores, vecs)
            # the over-retrieved blocks' KV goes to the device before the rerank
            cand_kv[name] = [[(kk.to(dev), vv.to(dev)) for kk, vv in st.kv[i]] for i in ids.tolist()]
        context = None
        if guide is not None and guide in cands:
            ids, _, vecs = cands[guide]
            top = ids[: cfg.retrieval.rerank_n]
            if top.numel():
                context = vecs[top].float().mean(dim=0)
        chosen: list[tuple[str, list[int], torch.Tensor, list[int]]] = []  # level, ids, scores, rows in candidates
        for name, (ids, scores, vecs) in cands.items():
            k = plan[name]
            rows = torch.arange(ids.numel(), device=ids.device)
            w = weights.get(name, 0.0)
            if context is not None and name != guide and w > 0 and ids.numel():
                cos = F.cosine_similarity(vecs[ids].float(), context[None], dim=-1)
                scores = (1.0 - w) * scores + w * cos
                order = scores.argsort(descending=True)
                ids, scores, rows = ids[order], scores[order], rows[order]
            chosen.append((name, ids[:k].tolist(), scores[:k], rows[:k].tolist()))
        _sync(dev)
        timings["retrieve"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        per_layer: list[list[torch.Tensor]] = [[self.prefix.kv[y, 0, 0]] for y in range(self.prefix.kv.shape[0])]
        per_layer_v: list[list[torch.Tensor]] = [[self.prefix.kv[y, 1, 0]] for y in range(self.prefix.kv.shape[0])]
        blocks = []
        for name, ids, scores, rows in chosen:  # levels in configuration order, best score first
            for i, (bid, r) in enumerate(zip(ids, rows)):
                for y, (kk, vv) in enumerate(cand_kv[name][r]):
                    per_layer[y].append(kk)
                    per_layer_v[y].append(vv)
                blocks.append((name, bid, float(scores[i])))
        ctx = torch.stack([torch.stack((torch.cat(ks, dim=1), torch.cat(vs, dim=1)))
                           for ks, vs in zip(per_layer, per_layer_v)])[:, :, None]  # [Y, 2, 1, H, C, D]
        _sync(dev)
        timings["page_in"] = time.perf_counter() - t0

        budget = max_new_tokens or cfg.generation.max_new_tokens
        text, tokens, margins, gen_t = self.generate(ctx, question, budget, stop=stop)
        timings.update(gen_t)
        timings["total"] = time.perf_counter() - t_start
        return ReferenceAnswer(text, tokens, margins, blocks, int(ctx.shape[4]), timings)

    @torch.inference_mode()
    def generate(self, context: torch.Tensor, question: str, max_new_tokens: int, stop: bool = True
                 ) -> tuple[str, list[int], list[float], dict[str, float]]:
        """Greedy decoding with eager attention and a concatenating cache.

        Returns ``(text, tokens, margins, timings)``; ``margins[i]`` is the gap
        between the best and second-best logit when token i was chosen.
        """
        model, dev = self.model, self.model.device
        timings: dict[str, float] = {}
        ids = model.tokenize(model.answer_template.format(question=question))
        stops = set(model.stop_ids) if stop else set()
        tokens: list[int] = []
        margins: list[float] = []
        t0 = time.perf_counter()
        with eager_attention(model):
            cache = _dynamic_cache(context)
            pos = context.shape[4]
            hidden = model.language_model(
                input_ids=ids[None], past_key_values=cache,
                position_ids=torch.arange(pos, pos + ids.numel(), device=dev)[None], use_cache=True,
            ).last_hidden_state[:, -1]
            pos += ids.numel()
            token, margin = _pick(model.lm_head(hidden)[0])
            _sync(dev)
            timings["prefill"] = timings["first_token"] = time.perf_counter() - t0
            while token not in stops and len(tokens) < max_new_tokens:
                tokens.append(token)
                margins.append(margin)
                if len(tokens) == max_new_tokens:
                    break
                hidden = model.language_model(
                    input_ids=torch.tensor([[token]], device=dev), past_key_values=cache,
                    position_ids=torch.tensor([[pos]], device=dev), use_cache=True,
                ).last_hidden_state[:, -1]
                pos += 1
                token, margin = _pick(model.lm_head(hidden)[0])
        _sync(dev)
        timings["generate"] = time.perf_counter() - t0
        return model.tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens, margins, timings


def _pick(logits: torch.Tensor) -> tuple[int, float]:
    top = logits.float().topk(2)
    return int(top.indices[0]), float(top.values[0] - top.values[1])


# ------------------------------------------------------------------------------------ comparisons
def session_context(session, question: str) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """What ``Session.ask`` assembles for ``question`` (the fast path's answer context,
    with no re-rotation), to compare with the reference mode: the context KV and the
    ``(level, block id)`` of its blocks in assembly order."""
    from .assembly import Piece, assemble
    from .blocks import Query

    s = session
    plan = s._plan(None, [])
    q = Query(question, s.model.query_vector(s.prefix, question), 0.0, s._ingestor.frames_seen)
    hits = {h.level: h for h in s.retriever.retrieve(q, s.backend, plan)}
    pieces = [Piece(h.level, h.ids, h.scores, s.backend.load_kv(h.level, h.ids), s.backend.metadata(h.level, h.ids))
              for lp in s.levels if (h := hits.get(lp.level.name)) is not None and len(h)]
    context, order = assemble(s.prefix.kv, pieces, s.config.assembly.order)
    return context, [(pieces[p].level, int(pieces[p].ids[r])) for p, r in order]


def compare_kept(fast: torch.Tensor, ref: torch.Tensor, ref_scores: torch.Tensor) -> dict[str, float]:
    """Compare kept token indices of the two paths, up to ties of the reference's scores.

    Args:
        fast, ref: ``[N, K]`` kept indices of the same blocks.
        ref_scores: ``[N, L]`` the scores the reference selected with.

    Returns:
        ``{"blocks": N, "identical": blocks with the same kept set, "max_gap": g}``
        where ``g`` is the largest amount by which a token the fast path kept
        (and the reference did not) scores below the reference's K-th best
        token: 0 when every difference is an exact tie, small for near-ties.
    """
    fast, ref, scores = fast.cpu().long(), ref.cpu().long(), ref_scores.cpu().float()
    identical, gap = 0, 0.0
    for f, r, s in zip(fast, ref, scores):
        fs, rs = set(f.tolist()), set(r.tolist())
        if fs == rs:
            identical += 1
            continue
        kth = float(s[r].min())
        extra = [float(s[i]) for i in fs - rs]
        gap = max(gap, kth - min(extra))
    return {"blocks": int(fast.shape[0]), "identical": identical, "max_gap": gap}


def compare_tokens(fast: list[int], ref: list[int], ref_margins: list[float]) -> dict[str, float]:
    """Compare greedy answers: ``{"same": bool, "first_diff": i or -1, "margin": m}`` where
    ``m`` is the reference's top-1 minus top-2 logit at the first difference
    (a near-tie when small)."""
    n = min(len(fast), len(ref))
    for i in range(n):
        if fast[i] != ref[i]:
            return {"same": False, "first_diff": i, "margin": ref_margins[i] if i < len(ref_margins) else 0.0}
    same = len(fast) == len(ref)
    return {"same": same, "first_diff": -1 if same else n, "margin": float("inf") if same else 0.0}
