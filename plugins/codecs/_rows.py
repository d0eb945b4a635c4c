"""Byte layout of a stored row, and the affine quantisation the integer codecs share.

A row is ``uint8 [S]``: named sections one after the other, each C-contiguous,
each starting at a multiple of 16 bytes (the padding is zero), ``S`` itself a
multiple of 16. A batch of rows ``[B, S]`` is read section by section as
zero-copy views (:meth:`RowLayout.views`), so decoding never copies bytes
before its arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mukv.errors import InputError

#: every section starts at a multiple of this (bytes); rows are padded to it
ALIGN = 16


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _pad(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Section:
    """One part of a row: ``shape`` values of ``dtype`` at byte ``offset``."""

    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


class RowLayout:
    """Named sections of one row, in order (see the module docstring).

    Args:
        sections: ``(name, shape, dtype)`` of each section, in storage order.
    """

    def __init__(self, sections: list[tuple[str, tuple[int, ...], torch.dtype]]):
        self.sections: dict[str, Section] = {}
        offset = 0
        for name, shape, dtype in sections:
            sec = Section(name, offset, tuple(int(s) for s in shape), dtype)
            self.sections[name] = sec
            offset += _pad(sec.nbytes)
        self.nbytes = offset

    def views(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """``rows uint8 [B, S]`` as ``{name: [B, *shape] of the section's dtype}`` (views, no copy)."""
        if rows.dtype != torch.uint8 or rows.ndim != 2 or rows.shape[1] != self.nbytes:
            raise ValueError(f"rows must be uint8 [B, {self.nbytes}]; got {rows.dtype} {tuple(rows.shape)}")
        if rows.stride(1) != 1 or rows.stride(0) % ALIGN or rows.storage_offset() % ALIGN:
            rows = rows.contiguous()
        b = rows.shape[0]
        return {s.name: rows[:, s.offset : s.offset + s.nbytes].view(s.dtype).view(b, *s.shape)
                for s in self.sections.values()}

    def allocate(self, b: int, device: torch.device | str) -> torch.Tensor:
        """``uint8 [b, S]`` zeros (padding bytes stay zero, so equal blocks give equal rows and crc32)."""
        return torch.zeros((b, self.nbytes), dtype=torch.uint8, device=device)

    def describe(self) -> str:
        """The layout in words (for docs and errors)."""
        return ", ".join(f"{s.name} {str(s.dtype).replace('torch.', '')} {list(s.shape)} at byte {s.offset}"
                         for s in self.sections.values()) + f"; {self.nbytes} bytes"


# ------------------------------------------------------------------------------ fp16 rounded one way
def _next_up(h: torch.Tensor) -> torch.Tensor:
    """The next float16 value towards +inf (finite inputs), by its bit pattern (any device)."""
    bits = h.view(torch.int16)
    up = torch.where(bits >= 0, bits + 1, bits - 1)  # positive: larger pattern; negative: smaller magnitude
    up = torch.where(bits == torch.iinfo(torch.int16).min, torch.ones_like(bits), up)  # -0.0 -> smallest subnormal
    return up.view(torch.float16)


def half_up(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) as the smallest float16 that is ``>= x``."""
    h = x.to(torch.float16)
    return torch.where(h.float() < x, _next_up(h), h)


def half_down(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) as the largest float16 that is ``<= x``."""
    return -half_up(-x)


def exact_div(x: torch.Tensor, d: float) -> torch.Tensor:
    """``x / d`` rounded once, on every device: CUDA divides by a Python or CPU scalar as ``x * (1 / d)``
    (two roundings), which would give the GPU other bytes than the CPU; a 0-dim tensor on ``x``'s
    device is divided by exactly, as on the CPU."""
    return x / x.new_full((), d)


def affine(lo: torch.Tensor, hi: torch.Tensor, levels: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 minimum and step of an affine grid ``minimum + q * step``, ``q = 0 .. levels``, that covers
    ``[lo, hi]`` (float32): ``minimum <= lo`` and ``minimum + levels * step >= hi``, so no value clips and
    every value is within ``step / 2`` of its grid point.

    Raises:
        InputError: a minimum or a step beyond float16 (65504), naming ``what``.
    """
    m16 = half_down(lo)
    step16 = half_up(exact_div(hi - m16.float(), levels))
    short = m16.float() + levels * step16.float() < hi  # float32 rounding of the cover: one more step up
    step16 = torch.where(short, _next_up(step16), step16)
    if not bool(torch.isfinite(m16).all() & torch.isfinite(step16).all()):
        big = float(torch.maximum(lo.abs().amax(), hi.abs().amax()))
        raise InputError(f"{what}: KV values up to {big:.3g} in magnitude exceed the float16 range of this codec's "
                         "minimums and steps (65504); refused, nothing of the batch was stored (use the \"fp8\" or "
                         "\"none\" codec)")
    return m16, step16


def quantise_(x: torch.Tensor, m16: torch.Tensor, step16: torch.Tensor, levels: int) -> torch.Tensor:
    """``round((x - minimum) / step)`` in ``0 .. levels`` as uint8 (broadcasting ``m16``, ``step16``); ``x``
    (float32, the caller's own copy) is overwritten on the way."""
    # a zero step means a constant group (every value is the minimum): 0 / tiny = 0
    x.sub_(m16).div_(step16.float().clamp_min(1e-30)).round_().clamp_(0, levels)
    return x.to(torch.uint8)


def dequantise_(q: torch.Tensor, m16: torch.Tensor, step16: torch.Tensor) -> torch.Tensor:
    """``minimum + q * step`` in place on ``q`` (float32 codes), broadcasting ``m16``, ``step16``. ``q * step``
    is exact in float32 (at most 8 + 11 significant bits), so the result is rounded once, the same on every
    device (whether the two steps are fused or not)."""
    return q.mul_(step16).add_(m16)


def _grid_error(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, dims: tuple[int, ...],
                levels: int) -> torch.Tensor:
    """Squared error, summed over ``dims`` (kept) in float64, of ``x`` through the float16 grid that covers
    ``[lo, hi]`` (values outside clamp to its ends): exactly what :func:`quantise_` then :func:`dequantise_`
    give. Every step but the sum is rounded once, the same on every device; the float64 sum makes the order
    in which a device adds up a group matter only below 2**-50 of it."""
    m16, step16 = affine(lo, hi, levels, "range search")  # inside a range that fitted: cannot raise
    q = (x - m16).div_(step16.float().clamp_min(1e-30)).round_().clamp_(0, levels)
    return dequantise_(q, m16, step16).sub_(x).square_().sum(dim=dims, keepdim=True, dtype=torch.float64)


def search_range(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, dims: tuple[int, ...], levels: int,
                 coarse: float = 0.1, most: float = 0.3, finer: tuple[float, ...] = (0.05, 0.025, 0.0125),
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The range each group of ``x`` is quantised over, chosen for the least squared error (MSE-optimal
    clipping of a uniform grid), all groups at once.

    ``x`` (float32) is reduced over ``dims`` into groups; ``lo``, ``hi`` are each group's minimum and maximum
    (``keepdim`` shapes), ``w = hi - lo``. A candidate range is ``[lo + a w, hi - b w]``: each end clipped by
    its own fraction. First every ``a, b`` in steps of ``coarse`` with ``a + b <= most`` (10 candidates at
    0.1 and 0.3), then around each group's best the 8 neighbours ``a +- f, b +- f`` (not below 0) for each
    ``f`` of ``finer`` in turn: 34 candidates, each end clipped by at most ``most + sum(finer)`` of the range
    (0.3875). Each candidate is scored by the squared error of the group's values decoded from its float16
    grid (what is stored: values outside it clamp to its ends), and the first least one kept, so no group
    ends with more squared error than its full range gives (a constant group keeps its exact grid). Every
    device chooses the same (the bytes encoded on a GPU are the CPU's) unless two candidates' errors differ
    by less than the float64 rounding of their sums. ``x`` is not changed.

    Returns:
        ``(lo, hi)`` of the chosen ranges, shaped as the given ones, within them.
    """
    w, zero = hi - lo, torch.zeros_like(lo)
    best_a, best_b, best = zero, zero, _grid_error(x, lo, hi, dims, levels)

    def trial(a: torch.Tensor, b: torch.Tensor) -> None:
        nonlocal best, best_a, best_b
        err = _grid_error(x, lo + a * w, hi - b * w, dims, levels)
        better = err < best
        best, best_a, best_b = torch.where(better, err, best), torch.where(better, a, best_a), \
            torch.where(better, b, best_b)

    n = round(most / coarse)
    for i in range(n + 1):
        for j in range(n + 1 - i):
            if i or j:
                trial(zero + i * coarse, zero + j * coarse)
    for f in finer:
        a0, b0 = best_a, best_b
        for da in (-f, 0.0, f):
            for db in (-f, 0.0, f):
                if da or db:
                    trial((a0 + da).clamp_(min=0), (b0 + db).clamp_(min=0))
    return lo + best_a * w, hi - best_b * w
