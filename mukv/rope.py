"""Re-rotation of stored keys onto one consistent timeline.

Keys are stored with RoPE applied at the positions they were prefilled with
(every block after the system prompt, so blocks overlap). Rotary embeddings
compose: rotating a key rotated at position ``p`` by ``q - p`` gives the key
rotated at ``q``. Re-rotation therefore needs only the position deltas, and
values are untouched.

Adapters with 1D RoPE use :func:`rerotate_1d`; an adapter with another scheme
(M-RoPE) provides its own ``rerotate(keys, old, new)`` method.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The half-rotation of transformers' RoPE convention: ``(-x2, x1)``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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
    delta = (new - old).to(keys.device)
    if not bool(delta.any()):
        return keys
    probe = keys.new_empty(1, 1, keys.shape[-1], dtype=torch.float32)
    cos, sin = rotary_emb(probe, delta.to(torch.long)[None])  # [1, C, D] each
    cos, sin = cos[0].float(), sin[0].float()
    k = keys.float()
    return (k * cos + rotate_half(k) * sin).to(keys.dtype)


def rerotate(model, keys: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Re-rotate with the adapter's own method if it has one, else 1D RoPE."""
    own = getattr(model, "rerotate", None)
    if own is not None:
        return own(keys, old, new)
    return rerotate_1d(model.language_model.rotary_emb, keys, old, new)
