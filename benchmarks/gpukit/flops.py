"""FLOPs per frame of the LLM prefill and of the vision towers: the work a roofline is drawn from."""

from __future__ import annotations

from typing import Any

from mukv.config import MukvConfig


def prefill_flops(adapter: Any, config: MukvConfig, prefix_len: int) -> dict[str, float]:
    """FLOPs of the LLM prefill per frame, all levels.

    Per block of L tokens after a system prompt of P tokens, per layer:

    * linear: ``2 * L * (d*Hq*Dh + 2*d*Hk*Dh + Hq*Dh*d + 3*d*F)`` (q, k, v, o
      projections and the gated MLP; biases, norms, RoPE and activations left out);
    * attention: ``4 * Hq * Dh * (L*P + L*(L+1)/2)`` (QK^T and PV over the
      entries the causal mask keeps);

    times Y layers, times blocks per frame (patch 4 of 49 tokens, frame 1 of
    196, segment 1/4 of 784 at MuKV's defaults). The last layer's column-sum
    pass and the unused last-layer output are overhead, not counted as work.
    """
    c = adapter.language_model.config
    d, hq, hk, y, f = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers, \
        c.intermediate_size
    dh = getattr(c, "head_dim", None) or d // hq
    linear = 2 * (d * hq * dh + 2 * d * hk * dh + hq * dh * d + 3 * d * f)
    t = adapter.tokens_per_frame
    total, per_level = 0.0, {}
    for lv in config.levels:
        length = lv.tokens if lv.tokens else lv.frames * t
        blocks_per_frame = (t // lv.tokens if lv.tokens else 1) / lv.frames
        p = prefix_len
        per_block = y * (length * linear + 4 * hq * dh * (length * p + length * (length + 1) / 2))
        per_level[lv.name] = per_block * blocks_per_frame
        total += per_level[lv.name]
    return {"per_frame": total, **{f"per_frame_{k}": v for k, v in per_level.items()},
            "linear_per_token_per_layer": float(linear)}


def vision_flops(adapter: Any) -> float:
    """FLOPs of the vision tower + projector per frame (same conventions as :func:`prefill_flops`).

    LLaVA-OneVision (SigLIP): per layer ``2 n (4 h^2 + 2 h F) + 4 h n^2`` over the
    ``n`` patches of a frame, plus the projector ``2 n (h e + e^2)``. Qwen2.5-VL:
    :func:`qwen_vision_flops`.
    """
    vc = adapter.model.config.vision_config
    if not hasattr(vc, "image_size"):
        return qwen_vision_flops(adapter)
    h, f, layers = vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers
    n = (vc.image_size // vc.patch_size) ** 2
    per_layer = 2 * n * (4 * h * h + 2 * h * f) + 4 * h * n * n
    e = adapter.hidden_size
    projector = 2 * n * (h * e + e * e)
    return float(layers * per_layer + projector)


def qwen_window_sizes(grid: tuple[int, int], merge: int, window: int) -> list[int]:
    """Patches in each attention window of one frame of Qwen2.5-VL's vision tower.

    ``grid``: merged tokens per side ``(gh / m, gw / m)``; windows tile the merged
    grid in squares of ``window`` merged tokens per side (the last ones cut at the
    edge, as ``get_window_index`` does), each merged token ``m * m`` patches.
    """
    gh, gw = grid
    rows = [min(window, gh - i) for i in range(0, gh, window)]
    cols = [min(window, gw - j) for j in range(0, gw, window)]
    return [r * c * merge * merge for r in rows for c in cols]


def qwen_vision_flops(adapter: Any) -> float:
    """FLOPs of Qwen2.5-VL's vision tower + patch merger per frame (one temporal step).

    ``n`` patches of ``C * t * p * p`` inputs, width ``h``, gated MLP of width ``F``:

    * patch embedding (a 3D convolution): ``2 n (C t p^2) h``;
    * per block: ``2 n (4 h^2 + 3 h F)`` (qkv, output projection, gated MLP) plus attention
      ``4 h sum(w_i^2)`` over its windows ``w_i`` (blocks in ``fullatt_block_indexes``
      attend over the whole frame, ``w = n``; the others over windows of
      ``window_size`` pixels, :func:`qwen_window_sizes`);
    * merger, per merged token (``n / m^2``): ``2 (H^2 + H e)`` with ``H = h m^2``.
    """
    vc = adapter.model.config.vision_config
    h, f, depth, p, m = vc.hidden_size, vc.intermediate_size, vc.depth, vc.patch_size, vc.spatial_merge_size
    t = vc.temporal_patch_size
    channels = getattr(vc, "in_channels", None) or getattr(vc, "in_chans", 3)
    gh, gw = adapter.grid  # merged tokens per side
    n = gh * gw * m * m
    windows = qwen_window_sizes((gh, gw), m, max(1, vc.window_size // m // p))
    full = set(vc.fullatt_block_indexes or ())
    attention = sum(4 * h * (n * n if i in full else sum(w * w for w in windows)) for i in range(depth))
    blocks = depth * 2 * n * (4 * h * h + 3 * h * f) + attention
    big = h * m * m
    merger = 2 * (n // (m * m)) * (big * big + big * vc.out_hidden_size)
    return float(2 * n * channels * t * p * p * h + blocks + merger)

