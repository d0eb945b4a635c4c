"""Re-rotation of stored keys onto one consistent timeline, and M-RoPE positions.

Keys are stored with RoPE applied at the positions they were prefilled with
(every block after the system prompt, so blocks overlap). Rotary embeddings
compose: rotating a key rotated at position ``p`` by ``q - p`` gives the key
rotated at ``q``. Re-rotation therefore needs only the position deltas, and
values are untouched.

Positions are stored per kept token as one int64 **position code**:

* 1D RoPE (LLaVA-OneVision, Qwen2): the code is the position itself;
* M-RoPE (Qwen2.5-VL, Qwen3-VL): the code packs the token's placement
  ``(origin, dt, h, w)`` (:func:`pack_mrope`); its three RoPE rows are
  ``(origin + dt, origin + h, origin + w)`` (temporal, height, width), as
  Qwen's ``get_rope_index`` places a visual token at ``start + (t, h, w)``.
  :class:`MRopeLayout` says how a model lays out frames, blocks and the
  re-rotated timeline.

Adapters with 1D RoPE use :func:`rerotate_1d`; an adapter with another scheme
provides its own ``rerotate(keys, old, new)`` method (M-RoPE:
:func:`rerotate_rows` with per-row deltas).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The half-rotation of transformers' RoPE convention: ``(-x2, x1)``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rerotate_rows(rotary_emb: torch.nn.Module, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Rotate keys by position deltas, with the decoder's own rotary embedding.

    Args:
        rotary_emb: the decoder's rotary embedding module (``forward(x, position_ids) -> (cos, sin)``);
            for M-RoPE it maps each frequency pair to its row (sections, interleaving).
        keys: ``[..., C, D]`` keys.
        delta: ``[C]`` (1D RoPE) or ``[R, C]`` (one row per M-RoPE axis) position deltas.

    Returns:
        ``[..., C, D]`` keys rotated by ``delta`` (same dtype). Because every
        frequency pair turns by ``position * inv_freq`` of the row that owns it,
        rotating by the per-row delta moves a key between any two positions.
        The module's ``attention_scaling`` (1 for plain RoPE) is divided out:
        stored keys carry it once already.
    """
    delta = delta.to(device=keys.device, dtype=torch.long)
    if not bool(delta.any()):
        return keys
    probe = keys.new_empty(1, 1, keys.shape[-1], dtype=torch.float32)
    pos = delta[None] if delta.ndim == 1 else delta[:, None, :]  # [1, C] or [R, 1, C]
    cos, sin = rotary_emb(probe, pos)  # [1, C, D] each
    scale = float(getattr(rotary_emb, "attention_scaling", 1.0) or 1.0)
    cos, sin = cos[0].float() / scale, sin[0].float() / scale
    k = keys.float()
    return (k * cos + rotate_half(k) * sin).to(keys.dtype)


def rerotate_1d(rotary_emb: torch.nn.Module, keys: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Move keys from positions ``old`` to ``new``.

    Args:
        rotary_emb: the decoder's rotary embedding module (``forward(x, position_ids) -> (cos, sin)``).
        keys: ``[..., C, D]`` keys rotated at ``old``.
        old: ``[C]`` positions the keys were rotated with.
        new: ``[C]`` target positions.

    Returns:
        ``[..., C, D]`` keys rotated at ``new`` (same dtype).
    """
    return rerotate_rows(rotary_emb, keys, new.to(keys.device) - old.to(keys.device))


def rerotate(model, keys: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Re-rotate with the adapter's own method if it has one, else 1D RoPE."""
    own = getattr(model, "rerotate", None)
    if own is not None:
        return own(keys, old, new)
    return rerotate_1d(model.language_model.rotary_emb, keys, old, new)


# --------------------------------------------------------------------------- M-RoPE codes
#: Bit widths of a packed M-RoPE position code: origin, dt, h, w (63 bits in all).
ORIGIN_BITS, DT_BITS, HW_BITS = 20, 21, 11
_DT_SHIFT = 2 * HW_BITS
_ORIGIN_SHIFT = _DT_SHIFT + DT_BITS


def pack_mrope(origin: torch.Tensor, dt: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
               check: bool = True) -> torch.Tensor:
    """One int64 code per token from its placement (broadcast tensors of non-negative ints).

    ``origin < 2**20`` (the unit's start position), ``dt < 2**21`` (its extra
    temporal offset), ``h, w < 2**11`` (its cell in the frame's token grid).
    ``check=False`` skips the range check (it reads the tensors back, a device
    synchronisation) where the caller has bounded the fields already.

    Raises:
        ValueError: a field out of range.
    """
    origin, dt, h, w = (torch.as_tensor(x).to(torch.int64) for x in (origin, dt, h, w))
    for name, x, bits in (("origin", origin, ORIGIN_BITS), ("dt", dt, DT_BITS), ("h", h, HW_BITS), ("w", w, HW_BITS)):
        if check and x.numel() and (int(x.min()) < 0 or int(x.max()) >= 1 << bits):
            raise ValueError(f"M-RoPE position field {name} out of range [0, 2**{bits}): "
                             f"{int(x.min())}..{int(x.max())}")
    return (origin << _ORIGIN_SHIFT) | (dt << _DT_SHIFT) | (h << HW_BITS) | w


def unpack_mrope(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(origin, dt, h, w)`` of position codes (each the shape of ``codes``)."""
    codes = codes.to(torch.int64)
    mask = (1 << HW_BITS) - 1
    return (codes >> _ORIGIN_SHIFT, (codes >> _DT_SHIFT) & ((1 << DT_BITS) - 1), (codes >> HW_BITS) & mask,
            codes & mask)


def mrope_rows(codes: torch.Tensor) -> torch.Tensor:
    """``[3, *codes.shape]`` RoPE rows (temporal, height, width) of position codes."""
    origin, dt, h, w = unpack_mrope(codes)
    return torch.stack((origin + dt, origin + h, origin + w))


@dataclass(frozen=True)
class MRopeLayout:
    """Where a model with M-RoPE puts visual tokens.

    A visual token of frame ``f`` (counted from its block's first frame), grid
    cell ``(h, w)``, in a block prefilled after ``start`` text tokens gets

        origin = start + f * origin_stride,  dt = f * t_stride,
        rows   = (origin + dt, origin + h, origin + w).

    Qwen2.5-VL (one video, frames along t): ``t_stride = positions per frame``,
    ``origin_stride = 0``. Qwen3-VL (each frame its own grid of t = 1, placed
    after the previous one): ``t_stride = 0``, ``origin_stride = max(grid)``.
    The text after a visual run starts at ``max(all rows of its grid) + 1``
    (Qwen's ``get_rope_index``).

    Attributes:
        grid: ``(gh, gw)`` visual tokens per frame.
        t_stride: temporal positions per frame.
        origin_stride: positions every row moves per frame.
    """

    grid: tuple[int, int]
    t_stride: int = 1
    origin_stride: int = 0

    def block_codes(self, start: int, token_index: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` codes of blocks prefilled after ``start`` tokens.

        Args:
            start: text tokens before the block (the system prompt's length P).
            token_index: ``[B, L]`` each token's index in its window (frame-major,
                raster order in a frame), ascending within a block.
        """
        gh, gw = self.grid
        tpf = gh * gw
        frame = token_index.to(torch.int64) // tpf
        frame = frame - frame.amin(dim=-1, keepdim=True)  # counted from the block's first frame
        cell = token_index.to(torch.int64) % tpf
        # a block of L tokens spans at most L frames: bound the fields without reading the tensors back
        span = token_index.shape[-1] - 1
        bounded = (start + span * self.origin_stride < 1 << ORIGIN_BITS and span * self.t_stride < 1 << DT_BITS
                   and max(gh, gw) <= 1 << HW_BITS)
        return pack_mrope(start + frame * self.origin_stride, frame * self.t_stride, cell // gw, cell % gw,
                          check=not bounded)

    def extent(self, dt: torch.Tensor) -> torch.Tensor:
        """Positions a unit with temporal offset ``dt`` spans past its origin: the text
        after it starts at ``origin + extent``."""
        gh, gw = self.grid
        return torch.clamp(dt, min=max(gh, gw) - 1) + 1

    def timeline(self, codes: torch.Tensor, block: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
        """Lay assembled tokens out as one video after ``start`` text tokens.

        Every run of tokens that shares a block and a frame of it (a *unit*:
        one frame of a frame or segment block, or a patch block) becomes the
        next frame of the timeline, in assembled order; grid cells are kept.

        Args:
            codes: ``[C]`` stored codes of the assembled tokens, in assembled order.
            block: ``[C]`` index of each token's block in assembled order.
            start: position of the first visual token (the system prompt's length).

        Returns:
            ``(new codes [C], next position)``: the position of the first text
            token after the context.
        """
        if codes.numel() == 0:
            return codes, start
        origin, dt, h, w = unpack_mrope(codes)
        new_unit = torch.ones_like(codes, dtype=torch.bool)
        new_unit[1:] = (block[1:] != block[:-1]) | (origin[1:] != origin[:-1]) | (dt[1:] != dt[:-1])
        unit = new_unit.to(torch.int64).cumsum(0) - 1  # [C], 0 .. U - 1
        new_origin = start + unit * self.origin_stride
        new_dt = unit * self.t_stride
        span = codes.numel() - 1  # at most C units
        bounded = start + span * self.origin_stride < 1 << ORIGIN_BITS and span * self.t_stride < 1 << DT_BITS
        new = pack_mrope(new_origin, new_dt, h, w, check=not bounded)
        nxt = int((new_origin + self.extent(new_dt)).max())
        return new, nxt
