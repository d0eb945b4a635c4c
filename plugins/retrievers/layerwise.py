"""Per-layer retrieval, ReKV's: every layer reads its own top-k blocks.

At question time ReKV compares, in each layer, the question's queries averaged
over its tokens with every stored block's mean key (both without RoPE), and that
layer loads its own top-k blocks, in time order, after the initial prompt;
different layers may read different frames. The score is an inner product (its
code calls it a cosine but does not normalise), each query head against the key
head it attends with, summed over heads.

Here the blocks' per-layer keys come from levels stored with ``layer_keys``
(:meth:`mukv.interfaces.BlockIndex.layer_scores`), the question's queries from
:meth:`mukv.blocks.Query.layer_queries`, and each layer's choice goes back as
:attr:`mukv.blocks.Hits.layer_ids` for the assembly to build one context per
layer. Options (``retrieval`` configuration): ``chunk_blocks`` ranks runs of that
many consecutive blocks by their mean score (ReKV's ``chunk_size``);
``recent_blocks`` makes every layer read the most recent blocks too (the local
window; ReKV's public code reads only its top-k); ``layer_probe = "memory"`` runs
the question through the memory as ReKV does (layer y + 1's queries formed after the
question attended to the blocks layer y chose), ``"prompt"`` after the system prompt
alone.
"""

from __future__ import annotations

import math

import torch

from mukv.blocks import Hits, Query
from mukv.config import MukvConfig
from mukv.errors import RetrievalError, expect
from mukv.interfaces import BlockIndex, Retriever


def fold_queries(queries: torch.Tensor, vector_dim: int) -> torch.Tensor:
    """``[Y, Hq, n, D]`` question queries -> ``[Y, Hk * D]``: the mean over tokens, each group
    of query heads that shares a key head summed, so that one inner product with a block's
    ``[Y, Hk * D]`` keys sums every query head against its own key head.

    Raises:
        RetrievalError: query and key heads that do not group.
    """
    expect(queries, torch.Tensor, "fold_queries: queries")
    y, hq, _, d = queries.shape
    hk = vector_dim // d
    if hk < 1 or hk * d != vector_dim or hq % hk:
        raise RetrievalError(f"{hq} query heads of dimension {d} do not group over keys of dimension {vector_dim}")
    return queries.mean(dim=2).reshape(y, hk, hq // hk, d).sum(dim=2).reshape(y, hk * d)


def choose(scores: torch.Tensor, k: int, chunk: int = 1, recent: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each layer's blocks: ``scores [Y, N]`` -> ``(ids [Y, k'], scores [Y, k'])``, ids ascending.

    ``k' = min(k, N)``. The ``recent`` newest blocks are always taken; the rest are the best
    runs of ``chunk`` consecutive blocks by mean score (a shorter last run by its own mean),
    cut to ``k'`` ids.
    """
    expect(scores, torch.Tensor, "choose: scores")
    y, n = scores.shape
    k = min(int(k), n)
    if k <= 0:
        empty = torch.empty(y, 0, dtype=torch.long, device=scores.device)
        return empty, scores.new_empty(y, 0)
    r = min(int(recent), k)
    m = n - r  # candidates 0 .. m - 1
    parts = [torch.arange(m, n, device=scores.device).expand(y, -1)] if r else []
    want = k - r
    if want:
        cand = scores[:, :m]
        runs = math.ceil(m / chunk)
        pad = runs * chunk - m
        padded = torch.nn.functional.pad(cand, (0, pad), value=0.0).reshape(y, runs, chunk)
        sizes = torch.full((runs,), float(chunk), device=scores.device)
        if pad:
            sizes[-1] = chunk - pad
        run_score = padded.sum(dim=2) / sizes  # [Y, runs]
        top = run_score.argsort(dim=1, descending=True, stable=True)  # [Y, runs], best first
        ids = (top[:, :, None] * chunk + torch.arange(chunk, device=scores.device)).reshape(y, -1)
        valid = ids < m
        # keep the first `want` valid ids of each layer, in rank order
        rank = valid.long().cumsum(dim=1)
        keep = valid & (rank <= want)
        parts.insert(0, ids[keep].reshape(y, want))
    ids = torch.cat(parts, dim=1).sort(dim=1).values
    return ids, scores.gather(1, ids)


class LayerwiseRetriever(Retriever):
    """Every layer its own top-k blocks by its own question–key inner product (ReKV).

    Args:
        chunk_blocks: rank runs of this many consecutive blocks (ReKV's ``chunk_size``).
        recent_blocks: the most recent blocks every layer reads, counted in its top-k.
    """

    needs_layer_keys = True  # a session refuses levels it searches that are stored without them

    def __init__(self, chunk_blocks: int = 1, recent_blocks: int = 0, layer_probe: str = "prompt"):
        self.chunk_blocks = chunk_blocks
        self.recent_blocks = recent_blocks
        self.layer_probe = layer_probe

    @classmethod
    def from_config(cls, config: MukvConfig) -> "LayerwiseRetriever":
        r = config.retrieval
        return cls(r.chunk_blocks, r.recent_blocks, r.layer_probe)

    def retrieve(self, query: Query, index: BlockIndex, top_k: dict[str, int]) -> list[Hits]:
        wanted = {level: k for level, k in top_k.items() if k > 0 and index.count(level) > 0}
        if not wanted:
            return []
        dim = query.vector.numel()
        if self.layer_probe == "memory":  # ReKV's question pass: each layer chooses, then attends to its choice
            picked: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {level: [] for level in wanted}

            def layer_choice(layer: int, queries: torch.Tensor) -> list[Hits]:
                q = fold_queries(queries[None], dim).to(query.vector.device)  # [1, V]
                hits = []
                for level, k in wanted.items():
                    scores = index.layer_scores(level, q, layers=[layer])  # [1, N]
                    ids, chosen = choose(scores, k, self.chunk_blocks, self.recent_blocks)
                    picked[level].append((ids[0], chosen[0]))
                    hits.append(Hits(level, ids[0], chosen[0]))
                return hits

            query.layer_queries(layer_choice)
            return [layer_hits(level, torch.stack([i for i, _ in rows]), torch.stack([s for _, s in rows]))
                    for level, rows in picked.items()]
        q = fold_queries(query.layer_queries(), dim)
        out = []
        for level, k in wanted.items():
            scores = index.layer_scores(level, q.to(query.vector.device))  # [Y, N]
            ids, chosen = choose(scores, k, self.chunk_blocks, self.recent_blocks)
            out.append(layer_hits(level, ids, chosen))
        return out


def layer_hits(level: str, layer_ids: torch.Tensor, layer_scores: torch.Tensor) -> Hits:
    """A :class:`Hits` from each layer's choice: ``ids`` the union, best first by the best score
    any layer gave the block."""
    flat, sc = layer_ids.reshape(-1), layer_scores.reshape(-1).float()
    union, inverse = torch.unique(flat, return_inverse=True)
    best = torch.full((union.numel(),), float("-inf"), device=sc.device).scatter_reduce(0, inverse, sc, "amax")
    order = best.argsort(descending=True, stable=True)
    return Hits(level, union[order], best[order], layer_ids)
