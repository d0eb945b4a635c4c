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
    """

    level: str
    ids: torch.Tensor
    scores: torch.Tensor
    kv: torch.Tensor
    meta: BlockMeta
    positions: torch.Tensor | None = None


@dataclass
class Assembled:
    """The answer context.

    Attributes:
        kv: ``[Y, 2, 1, H, C, D]`` system-prompt KV + retrieved blocks' KV.
        block_order: ``(piece index, row in piece)`` of each block, in assembled order.
        next_position: RoPE position of the first token after the context
            (the answer prompt's start); ``None``: C, the context's length.
    """

    kv: torch.Tensor
    block_order: list[tuple[int, int]]
    next_position: int | None = None


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
