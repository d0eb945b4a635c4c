"""KV in the layouts mukv keeps it and the transformers cache objects that view it.

:class:`PrefixKV` is the system prompt's KV; :func:`kv_to_cache`, :func:`buffer_cache` and
:func:`cache_to_kv` convert between mukv's ``[Y, 2, B, H, L, D]`` tensors and transformers'
per-layer caches without copying where a view will do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

@dataclass
class PrefixKV:
    """KV of the system prompt: ``kv [Y, 2, 1, H, P, D]`` and its token ids."""

    kv: torch.Tensor
    token_ids: torch.Tensor

    @property
    def length(self) -> int:
        """P, tokens in the system prompt."""
        return self.kv.shape[4]


def kv_to_cache(kv: torch.Tensor, extra: int = 0):
    """A transformers ``DynamicCache`` holding ``kv [Y, 2, B, H, S, D]``.

    The cache's layers write new tokens in place into one preallocated buffer
    ``[Y, 2, B, H, S + extra, D]`` (one copy of ``kv`` into it), instead of
    concatenating a new tensor per layer and per step; past ``extra`` tokens a
    layer grows by doubling.
    """
    y, _, b, h, s, d = kv.shape
    buf = torch.empty(y, 2, b, h, s + extra, d, dtype=kv.dtype, device=kv.device)
    buf[..., :s, :].copy_(kv)
    return buffer_cache(buf, s)


def buffer_cache(buf: torch.Tensor, length: int):
    """A ``DynamicCache`` over ``buf [Y, 2, B, H, capacity, D]`` whose first ``length``
    positions are filled; updates write into ``buf`` (no copy of the past)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layers = [_BufferLayer(buf[y, 0], buf[y, 1], length) for y in range(buf.shape[0])]
    return cache


def cache_to_kv(cache) -> torch.Tensor:
    """Stack a ``DynamicCache`` into ``[Y, 2, B, H, S, D]`` (one copy)."""
    return torch.stack([torch.stack((layer.keys, layer.values)) for layer in cache.layers])


def _buffer_layer_class():
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """A cache layer over preallocated ``keys, values [B, H, capacity, D]``.

        ``update`` copies the new tokens into the buffer and returns views of the
        filled part; a full buffer doubles (one copy), so any length works.
        """

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
            super().__init__()
            self._k, self._v, self._n = keys, values, length
            self.dtype, self.device = keys.dtype, keys.device
            self.keys, self.values = keys[:, :, :length], values[:, :, :length]
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:  # already initialised
            return None

        def update(self, key_states, value_states, *args, **kwargs):
            n, add = self._n, key_states.shape[-2]
            if n + add > self._k.shape[2]:
                cap = max(n + add, 2 * self._k.shape[2])
                k = self._k.new_empty(*self._k.shape[:2], cap, self._k.shape[3])
                v = self._v.new_empty(*self._v.shape[:2], cap, self._v.shape[3])
                k[:, :, :n].copy_(self._k[:, :, :n])
                v[:, :, :n].copy_(self._v[:, :, :n])
                self._k, self._v = k, v
            self._k[:, :, n : n + add].copy_(key_states)
            self._v[:, :, n : n + add].copy_(value_states)
            self._n = n + add
            self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]
            return self.keys, self.values

    return BufferLayer


_BUFFER_LAYER = None


def _BufferLayer(keys: torch.Tensor, values: torch.Tensor, length: int):
    global _BUFFER_LAYER
    if _BUFFER_LAYER is None:
        _BUFFER_LAYER = _buffer_layer_class()
    return _BUFFER_LAYER(keys, values, length)
