"""The "kivi4" codec: 4-bit KV, KIVI-style (per channel over a long block's tokens, per token in short ones)."""

from __future__ import annotations

import functools

import torch
from pydantic import Field

from mukv.blocks import EncodedKV
from mukv.errors import ConfigError
from mukv.interfaces import CodecSettings, KVCodec

from ._rows import RowLayout, affine, dequantise_, quantise_, search_range

LEVELS = 15


class Kivi4Settings(CodecSettings):
    """Settings of the "kivi4" codec."""

    channel_tokens: int = Field(default=64, ge=1, le=1 << 20)
    """Blocks of at least this many tokens quantise keys (and, with ``channel_values``, values) **per
    channel**: each channel of a head over the block's ``K`` tokens shares a float16 minimum and step,
    ``32 / K`` bits per value (0.05 at ``K = 627``). Shorter blocks quantise per token, in groups. The
    default 64 is where one channel's scales cost what a token's group of 64 channels costs."""

    channel_values: bool = True
    """Whether long blocks (``channel_tokens``) quantise values per channel too. ``False``: values per
    token in groups of ``value_group`` in every block (KIVI's choice; 0.25 bit per value at groups of 128)."""

    key_group: int = Field(default=64, ge=2, le=4096)
    """Channels of one token of one head whose keys share a minimum and a step in short blocks. A head
    dimension smaller than it is one group; otherwise it must divide the head dimension."""

    rotate: bool = False
    """Whether keys and values quantised per token (short blocks; values of long blocks without
    ``channel_values``) are first rotated by a Walsh-Hadamard transform over each head's channels (QuaRot's
    idea: an outlier channel's energy spreads over the head, so one step fits every channel of a group). The
    head dimension must then be a power of two. Off by default: on mukv-tiny it made the keys' error 20-45%
    smaller and the held-out clips no more accurate (docs/codecs-results.md)."""

    range_search: bool = False
    """Whether the encoder chooses each channel's or group's range for the least squared error instead of
    its minimum and maximum (MSE-optimal clipping): each end of the range clipped by its own fraction, up to
    0.39 of the range, searched coarse to fine over 34 candidates, values outside the chosen range clamped
    to its ends (``search_range`` in ``_rows.py``). The stored layout and the decoder are the same, so it is
    not recorded with a store: any kivi4 reads what it writes. Encoding costs 10 to 40 times as much (CPU,
    measured; on the device that encodes, at ingest). Off by default: on mukv-tiny it made the KV's error 8-9%
    smaller and the held-out clips 2 points less accurate (clipping the keys' extremes; docs/codecs-results.md)."""

    key_bits: int = Field(default=4, ge=2, le=6)
    """Bits of a key's code; a value's code gets the rest of the byte (``8 - key_bits``), so every setting
    stores the same bytes: a key and the value of the same token and channel share one byte. 4 (the
    default) is 4 + 4 bits, two keys or two values per byte as in stores written before this setting. On
    mukv-tiny the answers depend on the keys and hardly on the values: keys of 6 bits and values of 2 kept
    bf16's accuracy on the held-out clips where 4 + 4 lost 1.5 points (docs/codecs-results.md)."""

    value_group: int = Field(default=128, ge=2, le=1 << 16)
    """Channels of one token whose values share a minimum and a step (where values are quantised per token),
    counted over the token's heads one after the other (``H x D`` channels), so a group may span heads: up to
    the head dimension it must divide it; above, it must be a multiple of it covering whole heads (e.g. 128 is
    two heads of 64). ``H x D`` channels fewer than it are one group."""


def hadamard(t: torch.Tensor, scale_log2: int) -> torch.Tensor:
    """``H t * 2**scale_log2`` over the last dimension (``D``, a power of two; ``H`` the Walsh-Hadamard matrix
    of +-1, ``H H = D I``), as ``log2 D`` stages of additions and subtractions in ``t``'s dtype: the same bits
    on every device (no product is rounded but by a power of two, which is exact)."""
    shape, d = t.shape, t.shape[-1]
    h = 1
    while h < d:
        x = t.reshape(*shape[:-1], d // (2 * h), 2, h)
        a, b = x[..., 0, :], x[..., 1, :]
        t = torch.stack((a + b, a - b), dim=-2).reshape(shape)
        h *= 2
    return t.mul_(2.0 ** scale_log2) if scale_log2 else t


class _Groups:
    """Per-token groups of ``G`` channels over a token's ``H x D`` channels (head-major), as views of a
    ``[B, Y, H, K, D]`` tensor: ``m`` heads per group (``G > D``) or ``c`` groups per head (``G <= D``).
    Scales of the groups are ``[B, Y, H / m, K, c]``."""

    def __init__(self, h: int, d: int, g: int):
        g = min(g, h * d)
        self.m, self.c, self.width = max(1, g // d), max(1, d // g), min(g, d)

    def scale_shape(self, y: int, h: int, k: int) -> tuple[int, ...]:
        return (y, h // self.m, k, self.c)

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, Y, H, K, D]`` as ``[B, Y, H / m, m, K, c, D / c]`` (a view): reduce over dims 3 and 6."""
        b, y, h, k, d = t.shape
        return t.view(b, y, h // self.m, self.m, k, self.c, d // self.c)

    @staticmethod
    def spread(s: torch.Tensor) -> torch.Tensor:
        """Scales ``[B, Y, H / m, K, c]`` broadcastable against :meth:`view`."""
        return s[:, :, :, None, :, :, None]


class Kivi4Codec(KVCodec):
    """4-bit KV quantised as KIVI does, with the scales amortised over long blocks: in a block of at least
    ``channel_tokens`` tokens (MuKV's segment blocks) **keys are quantised per channel** (each channel of a
    head over the block's ``K`` tokens shares a minimum and a step: outlier channels keep their own range) and
    so are values (``channel_values``; else per token); in shorter blocks (patch and frame blocks) keys are
    quantised per token in groups of ``key_group`` channels of a head, and values per token in groups of
    ``value_group`` channels, which may span heads (with ``rotate``, each head's channels first rotated by a
    Walsh-Hadamard transform, so that an outlier channel does not set its group's step alone). Asymmetric, codes
    0..15 packed two per byte (or, with ``key_bits``, a key's and its value's codes sharing a byte), float16
    minimum and step.

    Row of a block ``(Y, 2, H, K, D)``, ``uint8 [S]``, sections at 16-byte aligned offsets:

    1. ``q``: uint8 ``[Y, 2, H, K, D / 2]``: channel ``2j`` in the low nibble of byte ``j``, channel
       ``2j + 1`` in the high nibble (keys at index 0 of the second axis, values at 1); where quantised per
       token (short blocks; values of long ones without ``channel_values``) with ``rotate``, the channels
       are those of ``H_D t / 2**(n // 2)``, ``t`` a token's ``D`` channels of one head, ``H_D`` the
       Walsh-Hadamard matrix of +-1 (Sylvester's order), ``n = log2 D``. With ``key_bits`` other than 4,
       ``q`` is uint8 ``[Y, H, K, D]`` instead (the same bytes): the key's code of a token and channel in the
       low ``key_bits`` bits of its byte, the value's code of the same token and channel in the high
       ``8 - key_bits`` bits;
    2. ``key_min``, ``key_step``: float16, per channel ``[Y, H, D]`` (long blocks) or per token group
       ``[Y, H, K, D / Gk]`` (short blocks, ``Gk = min(key_group, D)``);
    3. ``value_min``, ``value_step``: float16, per channel ``[Y, H, D]`` (long blocks with
       ``channel_values``) or per token group ``[Y, H / m, K, c]``, where a group of
       ``Gv = min(value_group, H x D)`` channels covers ``m = Gv / D`` heads (``Gv >= D``, ``c = 1``) or is
       one of ``c = D / Gv`` groups of a head (``m = 1``).

    A value decodes as ``min + q * step`` (float32), where rotated then ``H_D r / 2**(n - n // 2)``
    over each head's ``D`` decoded channels ``r`` (additions and subtractions in float32 and a product by a
    power of two: the same bits on every device), then the model's dtype. Bits per value: ``4 + 32 / K`` in
    long blocks with ``channel_values`` (4.05 at the 0.5B layout's segment blocks, ``K = 627``), ``4 + 16 / Gk
    + 16 / Gv`` in short ones (4.375 at 64 and 128), plus padding to 16 bytes.

    Error bound: every value quantised as it is (long blocks, or ``rotate`` off) is within ``step / 2`` of its
    decoded value, where ``step <= (max - min) / L * (1 + 2**-9)`` of its channel or group, ``L = 2**bits - 1``
    of its part (15 for 4 + 4; keys ``2**key_bits - 1``, values ``2**(8 - key_bits) - 1``); channels and
    groups of one float16 value (zeros included) decode exactly. Where rotated, every rotated value
    is within ``step / 2`` of its grid point, so a value is within ``sum(step / 2) / 2**(n - n // 2)`` over
    its token's ``D`` channels of the head (and its error vector has the L2 norm of the rotated one, times
    ``2**(n // 2 - n / 2)``), plus the float32 rounding of the two transforms (a few units of ``2**-24`` of
    the head's largest magnitudes times ``D``); zeros decode exactly. Then one rounding to the model's dtype.
    KV whose minimum or step does not fit float16 (a minimum below -65504, a range above 65504 x 15) is
    refused.

    With ``range_search`` the encoder chooses each channel's or group's grid over a range within its minimum
    and maximum, for the least squared error (``search_range`` in ``_rows.py``); the rows and their decoding
    are the same as without it. Then a value inside its grid ``[min, min + 15 step]`` is within ``step / 2``
    of its decoded value as above (``step`` at most that of the full range), and a value outside it decodes
    to the grid's nearer end, within 0.3875 of its channel's or group's ``max - min`` (the most an end is
    clipped); no channel or group decodes with more squared error than over its full range (rotated: in the
    rotated channels); zeros and constant channels still decode exactly.
    """

    Settings = Kivi4Settings

    def _check(self, h: int, d: int) -> tuple[int, int]:
        """``(Gk, Gv)`` for heads of ``d`` channels (raises :class:`ConfigError` if the layout cannot be stored)."""
        s = self.settings
        gk, gv = min(int(s.key_group), d), min(int(s.value_group), h * d)
        if d % 2:
            raise ConfigError(f"kv_codec kivi4: the head dimension {d} must be even (two codes per byte)")
        if s.rotate and d & (d - 1):
            raise ConfigError(f"kv_codec kivi4: rotate needs a head dimension that is a power of two, not {d}; "
                              "set rotate to false")
        if d % gk:
            raise ConfigError(f"kv_codec kivi4: key_group {s.key_group} does not divide the head dimension {d}; "
                              f"use a divisor of {d}")
        if (gv <= d and d % gv) or (gv > d and (gv % d or h % (gv // d))):
            raise ConfigError(f"kv_codec kivi4: value_group {s.value_group} neither divides the head dimension {d} "
                              f"nor covers whole heads of {h} x {d} channels; use a divisor of {d} or a multiple "
                              f"of it that divides {h * d}")
        return gk, gv

    def long(self, k: int) -> bool:
        """Whether a block of ``k`` tokens is quantised per channel."""
        return k >= int(self.settings.channel_tokens)

    @functools.lru_cache(maxsize=64)
    def _groups(self, block_shape: tuple[int, ...]) -> tuple[_Groups | None, _Groups | None]:
        """Per-token groups of keys and of values for a block shape; ``None``: per channel."""
        _, _, h, k, d = block_shape
        gk, gv = self._check(h, d)
        kg = None if self.long(k) else _Groups(h, d, gk)
        vg = None if self.long(k) and self.settings.channel_values else _Groups(h, d, gv)
        return kg, vg

    @functools.lru_cache(maxsize=64)
    def _rows(self, block_shape: tuple[int, ...]) -> RowLayout:
        y, _, h, k, d = block_shape
        kg, vg = self._groups(block_shape)
        ks = (y, h, d) if kg is None else kg.scale_shape(y, h, k)
        vs = (y, h, d) if vg is None else vg.scale_shape(y, h, k)
        f16 = torch.float16
        codes = (y, 2, h, k, d // 2) if self.split == (4, 4) else (y, h, k, d)
        return RowLayout([("q", codes, torch.uint8), ("key_min", ks, f16), ("key_step", ks, f16),
                          ("value_min", vs, f16), ("value_step", vs, f16)])

    def row_layout(self, block_shape, dtype):
        return (self._rows(tuple(int(s) for s in block_shape)).nbytes,), torch.uint8

    def record(self) -> dict:
        """The store's record: the settings a reader needs (``range_search`` only changes which bytes the encoder
        writes, not how they read; ``key_bits`` only where it is not 4, so 4 + 4 records as before it existed)."""
        rec = super().record()
        rec["settings"].pop("range_search", None)
        if rec["settings"].get("key_bits") == 4:  # 4 + 4: the record of stores written before the setting
            rec["settings"].pop("key_bits")
        return rec

    @property
    def split(self) -> tuple[int, int]:
        """Bits of a key's code and of a value's code."""
        kb = int(self.settings.key_bits)
        return kb, 8 - kb

    def _scales(self, t: torch.Tensor, dims: tuple[int, ...], what: str, levels: int = LEVELS
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """float16 minimum and step of each channel or group of ``t`` (reduced over ``dims``, kept) for codes
        ``0 .. levels``: over its minimum and maximum, or with ``range_search`` over the range of least squared
        error."""
        lo, hi = t.amin(dim=dims, keepdim=True), t.amax(dim=dims, keepdim=True)
        m, s = affine(lo, hi, levels, what)  # the full range must fit float16 (else refused), whatever is searched
        if self.settings.range_search:
            m, s = affine(*search_range(t, lo, hi, dims, levels), levels, what)
        return m, s

    def encode(self, kv: torch.Tensor) -> EncodedKV:
        shape = tuple(kv.shape[1:])
        b, (y, _, h, k, d) = kv.shape[0], shape
        layout, (kg, vg) = self._rows(shape), self._groups(shape)
        rows = layout.allocate(b, kv.device)
        v = layout.views(rows)
        x = kv.float() if kv.dtype != torch.float32 else kv.clone()  # our own copy: quantised in place
        q = torch.empty((b, y, 2, h, k, d), dtype=torch.uint8, device=kv.device)
        for i, (part, groups) in enumerate((("key", kg), ("value", vg))):
            t = x[:, :, i]  # [B, Y, H, K, D]
            if groups is None:  # per channel, over the block's tokens: [B, Y, H, 1, D]
                dims = (-2,)
            else:
                if self.settings.rotate:  # H t / 2**(n // 2), n = log2 D: orthonormal where n is even
                    t = hadamard(t, -((d.bit_length() - 1) // 2))
                t, dims = groups.view(t), (3, 6)  # per token group: [B, Y, H/m, 1, K, c, 1]
            levels = (1 << self.split[i]) - 1
            m, s = self._scales(t, dims, f"kivi4 {part}s", levels)
            q[:, :, i] = quantise_(t, m, s, levels).reshape(b, y, h, k, d)
            v[f"{part}_min"].copy_(m.view(v[f"{part}_min"].shape))
            v[f"{part}_step"].copy_(s.view(v[f"{part}_step"].shape))
        if self.split == (4, 4):  # two codes of one kind per byte
            q = q.view(b, y, 2, h, k, d // 2, 2)
            v["q"].copy_(q[..., 0] | (q[..., 1] << 4))
        else:  # a key's code in the low bits, the value's of the same token and channel in the high bits
            v["q"].copy_(q[:, :, 0] | (q[:, :, 1] << self.split[0]))
        return EncodedKV(rows, shape, kv.dtype)

    def decode(self, encoded: EncodedKV, device: torch.device | str) -> torch.Tensor:
        rows = encoded.rows.to(device, non_blocking=True)
        b, (y, _, h, k, d) = rows.shape[0], encoded.block_shape
        shape = tuple(encoded.block_shape)
        v, (kg, vg) = self._rows(shape).views(rows), self._groups(shape)
        p = v["q"]
        x = torch.empty((b, y, 2, h, k, d), dtype=torch.float32, device=rows.device)
        if self.split == (4, 4):
            x[..., 0::2] = p & 15  # the nibbles, straight into the float32 codes
            x[..., 1::2] = p >> 4
        else:
            kb = self.split[0]
            x[:, :, 0] = p & ((1 << kb) - 1)
            x[:, :, 1] = p >> kb
        for i, (part, groups) in enumerate((("key", kg), ("value", vg))):
            t, m, s = x[:, :, i], v[f"{part}_min"], v[f"{part}_step"]
            if groups is None:
                dequantise_(t, m.unsqueeze(-2), s.unsqueeze(-2))
            else:
                dequantise_(groups.view(t), groups.spread(m), groups.spread(s))
                if self.settings.rotate:  # H (H t / 2**(n // 2)) / 2**(n - n // 2) = D t / 2**n = t
                    n = d.bit_length() - 1
                    x[:, :, i] = hadamard(t, n // 2 - n)
        return x.to(encoded.dtype)
