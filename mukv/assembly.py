"""Assembly of the answer context: system-prompt KV + retrieved blocks' KV.

Two orders:

* ``level_score`` (the authors'): levels in configuration order, blocks of a
  level best score first;
* ``time``: every block in stream-time order (ties: configuration order of levels).

By default keys keep the RoPE positions they were stored with (the authors'
behaviour: blocks overlap in position) and the answer prompt starts at
position C, the context's length. With re-rotation, the assembled tokens are
moved onto one timeline in assembled order, as if they had been prefilled as
one sequence: ``P, P + 1, ...`` for 1D RoPE; for M-RoPE every retrieved frame
(or patch) becomes the next frame of one video (see :mod:`mukv.rope`), and
the answer prompt starts after the timeline. The whole context is built with
one concatenation and one token gather, never block by block.

Per-layer retrieval (a :class:`~mukv.blocks.Hits` with ``layer_ids``, ReKV's):
the union of the blocks any layer reads is paged in once (:func:`page_in`), and
each layer's context holds its own blocks, in the same order rule and on the same
timeline; every layer reads the same number of blocks, so the contexts have one
length and stack into one KV tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .interfaces import BlockMeta


@dataclass
class Piece:
    """Retrieved blocks of one level, paged in.

    Attributes:
        level: level name.
        ids: ``[k]`` block ids.
        scores: ``[k]`` retrieval scores.
        kv: ``[k, Y, 2, H, K, D]``.
        meta: frame ranges and times of the blocks.
        positions: ``[k, K]`` RoPE positions the keys were stored with.
        layer_rows: ``[Y, k']`` the rows each layer reads (per-layer retrieval), or
            ``None``: every layer reads every row.
    """

    level: str
    ids: torch.Tensor
    scores: torch.Tensor
    kv: torch.Tensor
    meta: BlockMeta
    positions: torch.Tensor | None = None
    layer_rows: torch.Tensor | None = None


@dataclass
class Assembled:
    """The answer context.

    Attributes:
        kv: ``[Y, 2, 1, H, C, D]`` system-prompt KV + retrieved blocks' KV.
        block_order: ``(piece index, row in piece)`` of each block, in assembled order.
        next_position: RoPE position of the first token after the context
            (the answer prompt's start); ``None``: C, the context's length.
        layer_share: per block of ``block_order``, the share of layers that read it
            (``None``: every layer reads every block).
    """

    kv: torch.Tensor
    block_order: list[tuple[int, int]]
    next_position: int | None = None
    layer_share: list[float] | None = None


def assemble(prefix: torch.Tensor, pieces: list[Piece], order: str,
             rerotate_fn=None, timeline_fn=None) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Build the context: ``(context [Y, 2, 1, H, C, D], block_order)``.

    The arguments are those of :func:`assemble_context`; use that to also learn
    where the answer prompt starts after a re-rotated M-RoPE timeline.
    """
    out = assemble_context(prefix, pieces, order, rerotate_fn, timeline_fn)
    return out.kv, out.block_order


def assemble_context(prefix: torch.Tensor, pieces: list[Piece], order: str,
                     rerotate_fn=None, timeline_fn=None) -> Assembled:
    """Build the context.

    Args:
        prefix: ``[Y, 2, 1, H, P, D]`` system-prompt KV.
        pieces: retrieved blocks per level, in configuration order of levels.
        order: "level_score" or "time".
        rerotate_fn: if given, ``f(keys [..., C', D], old [C'], new [C'])`` moving
            the assembled keys from their stored position codes to the timeline's
            (needs ``Piece.positions``).
        timeline_fn: ``f(old [C'], block [C'], start) -> (new [C'], next position)``,
            the timeline of the assembled tokens (``block``: each token's block
            index in assembled order; ``start`` = P); default: 1D positions
            ``P .. P + C' - 1`` (``HFVideoLLM.timeline``).

    Returns:
        An :class:`Assembled`.
    """
    if any(p.layer_rows is not None for p in pieces):
        return _assemble_per_layer(prefix, pieces, order, rerotate_fn, timeline_fn)
    rows: list[tuple[float, int, float, int, int]] = []  # sort key parts + (piece, row)
    for pi, piece in enumerate(pieces):
        t = piece.meta.t_start.tolist()
        s = piece.scores.tolist()
        for r in range(len(s)):
            rows.append((t[r], pi, -s[r], pi, r))
    if order == "time":
        rows.sort(key=lambda x: (x[0], x[1], x[2]))
    elif order == "level_score":
        rows.sort(key=lambda x: (x[1], x[2]))
    else:
        raise ValueError(f"unknown assembly order {order!r}; choose 'level_score' or 'time'")
    block_order = [(r[3], r[4]) for r in rows]
    if not pieces:
        return Assembled(prefix, block_order)
    # flatten each piece to [Y, 2, H, k*K, D], concatenate, then gather tokens in block order
    flat, offsets, sizes = [], [], []
    total = 0
    for piece in pieces:
        k, y, _, h, kk, d = piece.kv.shape
        flat.append(piece.kv.permute(1, 2, 3, 0, 4, 5).reshape(y, 2, h, k * kk, d))
        offsets.append(total)
        sizes.append(kk)
        total += k * kk
    tokens = torch.cat(flat, dim=3)
    dev = tokens.device
    starts = torch.tensor([offsets[p] + r * sizes[p] for p, r in block_order], dtype=torch.long, device=dev)
    lens = torch.tensor([sizes[p] for p, _ in block_order], dtype=torch.long, device=dev)
    first = torch.repeat_interleave(starts, lens)
    within = torch.arange(int(lens.sum()), device=dev) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
    index = first + within
    body = tokens.index_select(3, index)[:, :, None]  # [Y, 2, 1, H, C', D]
    next_position = None
    if rerotate_fn is not None:
        if any(p.positions is None for p in pieces):
            raise ValueError("re-rotation needs the stored positions of every retrieved block")
        old = torch.cat([p.positions.to(dev).reshape(-1) for p in pieces]).index_select(0, index)
        p0 = prefix.shape[4]
        if timeline_fn is None:
            new, next_position = torch.arange(p0, p0 + old.numel(), device=dev), p0 + old.numel()
        else:
            block = torch.repeat_interleave(torch.arange(len(block_order), device=dev), lens)  # [C']
            new, next_position = timeline_fn(old, block, p0)
        body = body.clone()
        body[:, 0] = rerotate_fn(body[:, 0], old, new.to(dev))
    return Assembled(torch.cat([prefix.to(body.dtype), body], dim=4), block_order, next_position)


def _sorted_rows(pieces: list[Piece], order: str, selection: list[list[int]]) -> list[tuple[int, int]]:
    """``(piece, row)`` of the selected rows of each piece in assembled order."""
    rows = []
    for pi, piece in enumerate(pieces):
        t, sc = piece.meta.t_start.tolist(), piece.scores.tolist()
        rows += [(t[r], pi, -sc[r], pi, r) for r in selection[pi]]
    if order == "time":
        rows.sort(key=lambda x: (x[0], x[1], x[2]))
    elif order == "level_score":
        rows.sort(key=lambda x: (x[1], x[2]))
    else:
        raise ValueError(f"unknown assembly order {order!r}; choose 'level_score' or 'time'")
    return [(r[3], r[4]) for r in rows]


def _assemble_per_layer(prefix: torch.Tensor, pieces: list[Piece], order: str, rerotate_fn, timeline_fn) -> Assembled:
    """Each layer's own blocks (``Piece.layer_rows``), one context per layer, stacked."""
    from .errors import RetrievalError

    y = pieces[0].kv.shape[1]
    for p in pieces:
        if p.layer_rows is not None and (p.layer_rows.ndim != 2 or p.layer_rows.shape[0] != y):
            raise RetrievalError(f"level {p.level!r}: per-layer block ids of shape {tuple(p.layer_rows.shape)}; "
                                 f"expected one row per layer ({y})")
    flat, offsets = [], []
    total = 0
    for piece in pieces:
        k, _, _, h, kk, d = piece.kv.shape
        flat.append(piece.kv.permute(1, 2, 3, 0, 4, 5).reshape(y, 2, h, k * kk, d))
        offsets.append(total)
        total += k * kk
    tokens = torch.cat(flat, dim=3)  # [Y, 2, H, N, D]
    dev = tokens.device
    per_layer: list[list[tuple[int, int]]] = []
    for layer in range(y):
        selection = [p.layer_rows[layer].tolist() if p.layer_rows is not None else list(range(p.kv.shape[0]))
                     for p in pieces]
        per_layer.append(_sorted_rows(pieces, order, selection))
    if len({len(o) for o in per_layer}) != 1:
        raise RetrievalError("per-layer retrieval must give every layer the same number of blocks of each level")
    index, block_ids = [], []
    for o in per_layer:
        starts = torch.tensor([offsets[p] + r * pieces[p].kv.shape[4] for p, r in o], dtype=torch.long, device=dev)
        lens = torch.tensor([pieces[p].kv.shape[4] for p, _ in o], dtype=torch.long, device=dev)
        first = torch.repeat_interleave(starts, lens)
        within = torch.arange(int(lens.sum()), device=dev) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
        index.append(first + within)
        block_ids.append(torch.repeat_interleave(torch.arange(len(o), device=dev), lens))
    if len({int(i.numel()) for i in index}) != 1:
        raise RetrievalError("per-layer retrieval must give every layer the same number of KV tokens")
    idx = torch.stack(index)  # [Y, C']
    c = idx.shape[1]
    body = torch.gather(tokens, 3, idx[:, None, None, :, None].expand(y, 2, tokens.shape[2], c, tokens.shape[4]))
    next_position = None
    if rerotate_fn is not None:
        if any(p.positions is None for p in pieces):
            raise ValueError("re-rotation needs the stored positions of every retrieved block")
        codes = torch.cat([p.positions.to(dev).reshape(-1) for p in pieces])
        p0 = prefix.shape[4]
        body = body.clone()
        nxt = []
        for layer in range(y):
            old = codes.index_select(0, idx[layer])
            if timeline_fn is None:
                new, n = torch.arange(p0, p0 + c, device=dev), p0 + c
            else:
                new, n = timeline_fn(old, block_ids[layer], p0)
            body[layer, 0] = rerotate_fn(body[layer, 0], old, new.to(dev))
            nxt.append(int(n))
        next_position = max(nxt)
    counts: dict[tuple[int, int], int] = {}
    for o in per_layer:
        for key in o:
            counts[key] = counts.get(key, 0) + 1
    union = _sorted_rows(pieces, order, [sorted({r for (p, r) in counts if p == pi}) for pi in range(len(pieces))])
    kv = torch.cat([prefix.to(body.dtype), body[:, :, None]], dim=4)
    return Assembled(kv, union, next_position, [counts[key] / y for key in union])


def page_in(backend, hits: list, levels: list[str], positions: bool) -> list[Piece]:
    """The retrieved blocks' KV, metadata (and stored positions) per level, in configuration order.

    A :class:`~mukv.blocks.Hits` with ``layer_ids`` is paged in once for the union of its
    blocks; its piece carries each layer's rows.

    Raises:
        RetrievalError: per-layer ids outside the hits' ids.
    """
    from .errors import RetrievalError

    by_level = {h.level: h for h in hits}
    pieces = []
    for name in levels:
        h = by_level.get(name)
        if h is None or len(h) == 0:
            continue
        rows = None
        if h.layer_ids is not None:
            ids = h.ids.reshape(-1)
            lid = torch.as_tensor(h.layer_ids).to(ids.device)
            if lid.ndim != 2 or lid.numel() == 0:
                raise RetrievalError(f"level {name!r}: per-layer block ids must be [layers, k]; got shape "
                                     f"{tuple(lid.shape)}")
            order = ids.argsort()
            at = torch.searchsorted(ids[order], lid.reshape(-1)).clamp_max(ids.numel() - 1)
            if not bool((ids[order][at] == lid.reshape(-1)).all()):
                raise RetrievalError(f"level {name!r}: per-layer block ids that are not among the level's hits")
            rows = order[at].reshape(lid.shape)
        pieces.append(Piece(h.level, h.ids, h.scores, backend.load_kv(h.level, h.ids), backend.metadata(h.level, h.ids),
                            backend.positions(h.level, h.ids) if positions else None, rows))
    return pieces


def retrieved_blocks(pieces: list[Piece], assembled: Assembled) -> list:
    """The :class:`~mukv.blocks.RetrievedBlock` s of an assembled context, in assembled order."""
    from .blocks import RetrievedBlock

    share = assembled.layer_share or [1.0] * len(assembled.block_order)
    out = []
    for (pi, r), s in zip(assembled.block_order, share):
        p = pieces[pi]
        out.append(RetrievedBlock(
            level=p.level, block_id=int(p.ids[r]), score=float(p.scores[r]),
            frame_start=int(p.meta.frame_start[r]), frame_end=int(p.meta.frame_end[r]),
            t_start=float(p.meta.t_start[r]), t_end=float(p.meta.t_end[r]), tokens=int(p.kv.shape[4]),
            layer_share=float(s)))
    return out
