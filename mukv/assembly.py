"""Assembly of the answer context: system-prompt KV + retrieved blocks' KV.

Two orders:

* ``level_score`` (the authors'): levels in configuration order, blocks of a
  level best score first;
* ``time``: every block in stream-time order (ties: configuration order of levels).

By default keys keep the RoPE positions they were stored with (the authors'
behaviour: blocks overlap in position). With re-rotation, the assembled tokens
are moved onto one timeline, ``P, P + 1, ...`` in assembled order, as if they
had been prefilled as one sequence (see :mod:`mukv.rope`). The whole context is
built with one concatenation and one token gather, never block by block.
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


def assemble(prefix: torch.Tensor, pieces: list[Piece], order: str,
             rerotate_fn=None) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Build the context.

    Args:
        prefix: ``[Y, 2, 1, H, P, D]`` system-prompt KV.
        pieces: retrieved blocks per level, in configuration order of levels.
        order: "level_score" or "time".
        rerotate_fn: if given, ``f(keys [..., C', D], old [C'], new [C'])`` moving
            the assembled keys to positions ``P .. P + C' - 1`` (needs
            ``Piece.positions``).

    Returns:
        ``(context [Y, 2, 1, H, C, D], block_order)`` where ``block_order`` lists
        ``(piece index, row in piece)`` in assembled order.
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
        return prefix, block_order
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
    if rerotate_fn is not None:
        if any(p.positions is None for p in pieces):
            raise ValueError("re-rotation needs the stored positions of every retrieved block")
        old = torch.cat([p.positions.to(dev).reshape(-1) for p in pieces]).index_select(0, index)
        p0 = prefix.shape[4]
        new = torch.arange(p0, p0 + old.numel(), device=dev)
        body = body.clone()
        body[:, 0] = rerotate_fn(body[:, 0], old, new)
    return torch.cat([prefix.to(body.dtype), body], dim=4), block_order
