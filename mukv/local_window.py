"""ReKV's side of the model: sliding-window encoding of the stream, and the question's
per-layer queries.

ReKV (Di et al., ICLR 2025) does not prefill a frame on its own: each new frame
attends to the initial prompt and the most recent ``n_local`` tokens of the
stream (sliding-window attention), and its KV is then offloaded in one-frame
blocks. At question time every layer compares the question's queries, averaged
over its tokens, with each block's mean key (both without RoPE) and reads its
own top-k blocks.

:func:`prefill_window` is that encoding for a run of consecutive blocks of one
level: the window's keys are moved onto one timeline after the system prompt
(:func:`mukv.rope.rerotate`, so any RoPE scheme works), the new blocks follow
it, and each block attends to the system prompt, to the ``span`` tokens before
its own first token and causally to itself, under one explicit mask. Stored
keys keep the positions they were computed at (bounded by the window, however
long the stream), as every stored block's do. The pipeline prefills one window
of a level per forward, so a block's layout (system prompt, its window, itself)
never depends on how the frames were fed; ReKV places its initial prompt at a
fixed distance ``n_local`` from every query once the window is full, here it
sits right before the window (a distance of ``n_local`` plus the prompt's own
offsets).

:func:`question_queries` runs the question after the system prompt and returns
every layer's queries with RoPE removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .model import COLUMN_SUM_CHUNK_BYTES, PrefixKV, _capture, _Causal, buffer_cache, kv_to_cache
from .rope import rerotate


@dataclass
class WindowKV:
    """Tokens a run of blocks attends to besides the system prompt (for :func:`prefill_window`).

    Attributes:
        kv: ``[Y, 2, H, n, D]`` keys (RoPE applied at ``codes``) and values of the last ``n`` tokens.
        codes: ``[n]`` position codes the keys were rotated with.
        block: ``[n]`` index of each token's block, ascending (0 = the oldest block kept).
    """

    kv: torch.Tensor
    codes: torch.Tensor
    block: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.kv.shape[3])

    @property
    def blocks(self) -> int:
        return int(self.block[-1]) + 1 if self.block.numel() else 0

class _Masked:
    """Marks a forward of ours that attends under ``mask`` (True = attend), with an optional hook."""

    def __init__(self, mask: torch.Tensor | None, hook: Callable | None):
        self.mask, self.hook = mask, hook

    def __enter__(self) -> "_Masked":
        self._saved = tuple(getattr(_capture, k, None) for k in ("static_mask", "hook", "fast", "causal", "module"))
        _capture.static_mask, _capture.hook, _capture.fast = self.mask, self.hook, True
        if self.mask is None:
            _capture.causal, _capture.module, _capture.colsum = True, None, None
        return self

    def __exit__(self, *exc: Any) -> None:
        (_capture.static_mask, _capture.hook, _capture.fast, causal, module) = self._saved
        _capture.causal, _capture.module = bool(causal), module


def own_column_sums(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, scaling: float | None, start: int,
                    block_len: int, chunk_bytes: int | None = None) -> torch.Tensor:
    """Attention each token of a block receives from the block's own queries, under ``mask``.

    Args:
        query: ``[1, Hq, c * L, D]`` the queries of ``c`` blocks of ``L`` tokens.
        key: ``[1, Hk, C, D]`` every key they may see.
        mask: ``[c * L, C]`` True where a query sees a key.
        scaling: softmax scale (default ``D ** -0.5``).
        start: the key index of the first block's first token (block ``i``'s own keys are
            ``start + i * L ..``).
        block_len: L.

    Returns:
        ``[c, L]`` float32: each token's attention from its own block's queries, summed over
        those queries and averaged over heads (the softmax runs over every visible key, the
        window's included), the MuKV attention signal of a block encoded in context.
    """
    _, hq, n, d = query.shape
    hk, total = key.shape[1], key.shape[2]
    c = n // block_len
    scale = scaling if scaling is not None else d**-0.5
    kf = key[0].float().repeat_interleave(hq // hk, dim=0)  # [Hq, C, D]
    budget = COLUMN_SUM_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    per = max(1, budget // max(1, hq * block_len * total * 4))  # blocks per chunk
    out = torch.empty(c, block_len, dtype=torch.float32, device=query.device)
    rows = torch.arange(block_len, device=query.device)
    for b0 in range(0, c, per):
        b1 = min(c, b0 + per)
        q = query[0, :, b0 * block_len : b1 * block_len].float() * scale  # [Hq, r, D]
        logits = torch.matmul(q, kf.transpose(-1, -2))  # [Hq, r, C]
        logits.masked_fill_(~mask[b0 * block_len : b1 * block_len][None], float("-inf"))
        w = torch.softmax(logits, dim=-1).mean(dim=0).view(b1 - b0, block_len, total)  # [nb, L, C]
        cols = start + (torch.arange(b0, b1, device=query.device) * block_len)[:, None] + rows[None]  # [nb, L]
        own = torch.gather(w, 2, cols[:, None, :].expand(-1, block_len, -1))  # [nb, L rows, L cols]
        out[b0:b1] = own.sum(dim=1)
    return out


@torch.inference_mode()
def prefill_window(llm, prefix: PrefixKV, embeds: torch.Tensor, token_index: torch.Tensor,
                   window: WindowKV | None, span: int, attention: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Prefill consecutive blocks with sliding-window attention (ReKV's encoding).

    Args:
        llm: the model adapter (:class:`mukv.model.HFVideoLLM`).
        prefix: the system prompt's KV (every block sees it whole, as ReKV's initial prompt).
        embeds: ``[c, L, E']`` the blocks' rows, in stream order.
        token_index: ``[c, L]`` each token's index in its window (as :meth:`prefill_blocks`).
        window: the tokens before the first block (``None``: the stream's start).
        span: how many tokens before its own first token a block attends to (ReKV's
            ``n_local``); blocks of the run see each other within it.
        attention: also return the last layer's attention column sums (:func:`own_column_sums`).

    Returns:
        ``(kv [Y, 2, c, H, L, D], attention [c, L] or None, codes [c, L])``: the blocks' KV,
        their keys rotated at ``codes`` (the window, then the blocks, on one timeline after
        the system prompt).
    """
    c, length = embeds.shape[:2]
    p, dev = prefix.length, llm.device
    wn = 0 if window is None else window.tokens
    own = llm.block_positions(p, token_index.to(dev)).expand(c, -1)  # [c, L] as if each were prefilled alone
    first_block = 0 if window is None else window.blocks
    block = first_block + torch.arange(c, device=dev).repeat_interleave(length)
    if wn:
        old = torch.cat([window.codes.to(dev), own.reshape(-1)])
        block = torch.cat([window.block.to(dev), block])
    else:
        old = own.reshape(-1)
    new, _ = llm.timeline(old, block, p)
    buf = llm._kv_buffer(1, p + wn + c * length)
    buf[..., :p, :].copy_(prefix.kv)
    if wn:
        buf[:, 0, 0, :, p : p + wn].copy_(rerotate(llm, window.kv[:, 0].to(dev), window.codes.to(dev), new[:wn]))
        buf[:, 1, 0, :, p : p + wn].copy_(window.kv[:, 1])
    n = c * length
    mask = _band_mask(p, wn, c, length, span, dev)
    codes = new[wn:]
    inputs, extra = llm.block_inputs(embeds.reshape(1, n, -1))
    colsum = _masked_forward(llm, mask, inputs, extra, buf, p + wn, codes[None], length, attention)
    y, _, _, h, _, d = buf.shape
    kv = buf[:, :, 0, :, p + wn :, :].reshape(y, 2, h, c, length, d).permute(0, 1, 3, 2, 4, 5)
    return kv, colsum, codes.reshape(c, length)


def _masked_forward(llm, mask: torch.Tensor, inputs: torch.Tensor, extra: dict, buf: torch.Tensor, past: int,
                    codes: torch.Tensor, length: int, attention: bool) -> torch.Tensor | None:
    """One forward of ``inputs`` after the ``past`` tokens held in ``buf``, under ``mask``; the last
    layer's per-block column sums when ``attention`` (else ``None``)."""
    got: dict[str, torch.Tensor] = {}
    hook = None
    if attention:
        last = llm.language_model.layers[-1].self_attn

        def hook(module, query, key, value, scaling):
            if module is last:
                got["colsum"] = own_column_sums(query, key, mask, scaling, past, length)

    with _Masked(mask, hook):
        llm.language_model(inputs_embeds=inputs.to(llm.dtype), past_key_values=buffer_cache(buf, past),
                           position_ids=llm.position_ids(codes), use_cache=True, **extra)
    return got.get("colsum")


@torch.inference_mode()
def question_queries(llm, prefix: PrefixKV, question: str,
                     context: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                     context_tokens: int = 0) -> torch.Tensor:
    """The question's queries in every layer, without RoPE: ``[Y, Hq, n, D]`` float32.

    The question (the adapter's ``query_template``) runs after the system prompt, as for
    the query vector; every layer's queries are taken where attention sees them and
    rotated back to position 0 (:func:`mukv.rope.rerotate` with the adapter's text codes),
    so that they compare with block keys whatever position either was computed at.

    With ``context`` the question runs through the memory, as ReKV's question pass does:
    at layer ``y`` ``context(y, queries [Hq, n, D])`` (that layer's queries, RoPE removed)
    returns that layer's own blocks, ``(keys, values)`` ``[Hk, C, D]`` with keys rotated for
    the positions after the system prompt, and the question attends to them before going
    on to layer ``y + 1``; the question sits after them (``context_tokens`` = C, the same for
    every layer).
    """
    ids = llm.tokenize(llm.query_template.format(question=question))
    n, p = ids.numel(), prefix.length
    if n == 0:
        lay = llm.layout
        return torch.zeros(lay.num_layers, llm.language_model.config.num_attention_heads, 0, lay.head_dim)
    cache = kv_to_cache(prefix.kv, extra=n)
    start = p + (context_tokens if context is not None else 0)
    positions = torch.arange(start, start + n, device=llm.device)
    codes, zero = llm.text_codes(positions), llm.text_codes(torch.zeros_like(positions))
    got: list[torch.Tensor] = []

    def hook(module, query, key, value, scaling):
        raw = rerotate(llm, query[0], codes, zero)  # [Hq, n, D]
        got.append(raw)
        if context is None:
            return None
        kc, vc = context(len(got) - 1, raw.float())
        if kc.shape[1] != context_tokens:
            from .errors import RetrievalError

            raise RetrievalError(f"layer {len(got) - 1} read {kc.shape[1]} tokens; every layer must read "
                                 f"{context_tokens}")
        kc, vc = kc[None].to(key.dtype), vc[None].to(value.dtype)
        return torch.cat([key[:, :, :p], kc, key[:, :, p:]], dim=2), torch.cat([value[:, :, :p], vc, value[:, :, p:]], dim=2)

    with _Masked(None, hook):
        llm.language_model(input_ids=ids[None], past_key_values=cache, position_ids=positions[None], use_cache=True)
    return torch.stack(got).float()  # [Y, Hq, n, D]


def unrotated_mean_keys(llm, kv: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per-layer mean key of each block, RoPE removed: ``[B, Y, H * D]`` float32.

    Args:
        kv: ``[B, Y, 2, H, K, D]`` the blocks' kept KV.
        positions: ``[B, K]`` the codes their keys were rotated with.
    """
    b, y, _, h, k, d = kv.shape
    keys = kv[:, :, 0].permute(1, 2, 0, 3, 4).reshape(y, h, b * k, d)  # [Y, H, B*K, D]
    codes = positions.reshape(-1).to(keys.device)
    zero = llm.text_codes(torch.zeros_like(codes))
    raw = rerotate(llm, keys, codes, zero)
    return raw.float().reshape(y, h, b, k, d).mean(dim=3).permute(2, 0, 1, 3).reshape(b, y, h * d)


class WindowEncoder:
    """A level's sliding window, kept in one buffer between feeds: ReKV's encoding, block by block.

    The buffer holds, in order, the system prompt's KV, the window (the last
    ``window`` blocks' uncompressed KV) and room for the next blocks, whose KV the
    forward writes in place: nothing of the window is copied or re-rotated per
    block. Positions run on: each block is laid out after the previous one on one
    timeline (the adapter's :meth:`~mukv.model.HFVideoLLM.timeline`), and the system
    prompt is rotated to sit right before the window's oldest block, so that every
    block sees the layout of :func:`prefill_window` (system prompt, window, itself)
    with the same relative positions. When the positions pass ``rebase_at``, the
    window is moved back to start after the system prompt (one re-rotation). The
    buffer slides by one copy of the window every ``window`` blocks or so.

    A level whose windows hold several blocks (patch rows) runs each window's blocks
    in one forward under a band mask, each block seeing the ``window`` blocks before it.

    Args:
        llm: the model adapter.
        prefix: the system prompt's KV.
        window: blocks a block attends to before it.
        block_len: L, tokens per block.
        per_forward: blocks in one forward (the level's blocks per window).
        rebase_at: position past which the window moves back (default: four windows, at least 32,768).
    """

    def __init__(self, llm, prefix: PrefixKV, window: int, block_len: int, per_forward: int = 1,
                 rebase_at: int | None = None):
        self.llm, self.prefix = llm, prefix
        self.window, self.block_len, self.per_forward = int(window), int(block_len), int(per_forward)
        p = prefix.length
        span = self.window * self.block_len
        self.capacity = p + 2 * span + (self.per_forward + 1) * self.block_len
        nbytes = self.capacity * llm.layout.token_bytes()
        try:
            self.buf = llm._kv_buffer(1, self.capacity)  # [Y, 2, 1, H, capacity, D]
        except (RuntimeError, MemoryError) as exc:
            from .errors import ConfigError

            raise ConfigError(f"local_window of {self.window} blocks of {self.block_len} tokens needs a window buffer "
                              f"of {nbytes / 2**30:.1f} GiB on {llm.device}, which could not be allocated ({exc}); "
                              "lower levels.local_window") from None
        self.buf[..., :p, :].copy_(prefix.kv)
        self.a = self.b = p  # the window's slots [a, b)
        self.codes: list[torch.Tensor] = []  # per window block: [L] position codes
        self.starts: list[int] = []  # per window block: where its layout began on the timeline
        self.next = p  # the timeline position of the next block
        self.rebase_at = rebase_at if rebase_at is not None else max(1 << 15, p + 4 * span)

    # ------------------------------------------------------------------ state
    @property
    def tokens(self) -> int:
        return self.b - self.a

    def restore(self, kv: torch.Tensor, codes: torch.Tensor) -> None:
        """Start from stored blocks ``kv [w, Y, 2, H, L, D]`` (keys at ``codes [w, L]``), oldest first."""
        w = min(kv.shape[0], self.window)
        kv, codes = kv[kv.shape[0] - w :], codes[codes.shape[0] - w :]
        y, _, h, length, d = kv.shape[1:]
        dst = self.buf[:, :, 0, :, self.a : self.a + w * length]
        dst.copy_(kv.permute(1, 2, 3, 0, 4, 5).reshape(y, 2, h, w * length, d).to(dst.dtype))
        self.b = self.a + w * length
        self.codes = [c.to(self.llm.device) for c in codes]
        self.starts = [0] * w
        self._rebase()

    def _layout(self, codes: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
        """One block's codes ``[L]`` laid out at ``start``: ``(new codes, next position)``."""
        new, nxt = self.llm.timeline(codes, torch.zeros_like(codes), start)
        return new, int(nxt)

    def _rebase(self) -> None:
        """Move the window back to start right after the system prompt (one re-rotation of its keys)."""
        p = self.prefix.length
        start, news, starts = p, [], []
        for c in self.codes:
            new, nxt = self._layout(c, start)
            news.append(new)
            starts.append(start)
            start = nxt
        if self.codes:
            old = torch.cat(self.codes)
            keys = self.buf[:, 0, 0, :, self.a : self.b]
            keys.copy_(rerotate(self.llm, keys, old, torch.cat(news)))
        self.codes, self.starts, self.next = news, starts, start

    def _place_prefix(self) -> None:
        """The system prompt's KV in the slots before the window, rotated to end where the window begins."""
        p = self.prefix.length
        at = self.starts[0] if self.starts else self.next
        pos = torch.arange(p, device=self.llm.device)
        dst = self.buf[..., self.a - p : self.a, :]
        dst[:, 1].copy_(self.prefix.kv[:, 1])
        dst[:, 0].copy_(rerotate(self.llm, self.prefix.kv[:, 0], self.llm.text_codes(pos),
                                 self.llm.text_codes(pos + (at - p))))

    def _slide(self, need: int) -> None:
        """Make room for ``need`` more tokens after the window (one copy of the window to the front)."""
        p = self.prefix.length
        if self.b + need <= self.capacity:
            return
        n = self.b - self.a
        self.buf[..., p : p + n, :].copy_(self.buf[..., self.a : self.b, :])
        self.a, self.b = p, p + n

    # ------------------------------------------------------------------ encoding
    @torch.inference_mode()
    def encode(self, embeds: torch.Tensor, token_index: torch.Tensor, attention: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Prefill the blocks of one window of the level, in stream order, after the window.

        Args:
            embeds: ``[c, L, E']`` the blocks' rows.
            token_index: ``[c, L]`` each token's index in its window.
            attention: also return the last layer's column sums (:func:`own_column_sums`).

        Returns:
            ``(kv [Y, 2, c, H, L, D], attention [c, L] or None, codes [c, L])``; ``kv`` is a
            view of the buffer, valid until the next call (gather from it).
        """
        llm, p = self.llm, self.prefix.length
        c, length = embeds.shape[:2]
        n = c * length
        if self.next + n > self.rebase_at:
            self._rebase()
        self._slide(n)
        self._place_prefix()
        own = llm.block_positions(0, token_index.to(llm.device)).expand(c, -1)
        codes, starts = [], []
        for i in range(c):
            new, nxt = self._layout(own[i], self.next)
            codes.append(new)
            starts.append(self.next)
            self.next = nxt
        codes_t = torch.stack(codes)  # [c, L]
        wn = self.b - self.a
        view = self.buf[..., self.a - p :, :]
        inputs, extra = llm.block_inputs(embeds.reshape(1, n, -1))
        colsum = None
        if c == 1:  # one block after its whole window: plain causal attention aligned to the end
            last = llm.language_model.layers[-1].self_attn
            with _Causal(last if attention else None) as call:
                llm.language_model(inputs_embeds=inputs.to(llm.dtype), past_key_values=buffer_cache(view, p + wn),
                                   position_ids=llm.position_ids(codes_t.reshape(1, -1)), use_cache=True, **extra)
            if attention:
                colsum = call.colsum[:, p + wn :]
        else:
            mask = _band_mask(p, wn, c, length, self.window * length, llm.device)
            colsum = _masked_forward(llm, mask, inputs, extra, view, p + wn, codes_t.reshape(1, -1), length,
                                     attention)
        y, _, _, h, _, d = self.buf.shape
        kv = self.buf[:, :, 0, :, self.b : self.b + n, :].reshape(y, 2, h, c, length, d).permute(0, 1, 3, 2, 4, 5)
        # the new blocks join the window; the oldest leave it
        self.b += n
        self.codes += codes
        self.starts += starts
        drop = max(0, len(self.codes) - self.window)
        if drop:
            self.codes, self.starts = self.codes[drop:], self.starts[drop:]
            self.a += drop * length
        return kv, colsum, codes_t


def _band_mask(p: int, wn: int, c: int, length: int, span: int, device) -> torch.Tensor:
    """``[c * L, P + wn + c * L]``: every query sees the system prompt, and the ``span`` tokens before
    its block's first token and its own block causally."""
    n = c * length
    q_seq = wn + torch.arange(n, device=device)
    block_start = wn + (torch.arange(n, device=device) // length) * length
    k_seq = torch.arange(wn + n, device=device)
    visible = (k_seq[None] <= q_seq[:, None]) & (k_seq[None] >= (block_start - span)[:, None])
    return torch.cat([torch.ones(n, p, dtype=torch.bool, device=device), visible], dim=1)


def layer_context(llm, backend, hits: list, layer: int, start: int, cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's own blocks as a context for the question pass: ``(keys, values)`` ``[Hk, C, D]``.

    The blocks of ``hits`` (every level) are taken in time order, that layer's KV of each,
    and the keys moved onto the timeline after ``start`` tokens (the adapter's
    :meth:`~mukv.model.HFVideoLLM.timeline`), as the answer's assembly does. ``cache`` holds
    the blocks already read during this question ((level, id) -> KV row, codes, start time),
    so that a block several layers choose is read once.
    """
    rows = []
    for order, h in enumerate(hits):
        ids = [int(i) for i in h.ids.reshape(-1).tolist()]
        need = [i for i in ids if (h.level, i) not in cache]
        if need:
            t = torch.tensor(need, dtype=torch.long)
            kv, pos, meta = backend.load_kv(h.level, t), backend.positions(h.level, t), backend.metadata(h.level, t)
            for j, i in enumerate(need):
                cache[(h.level, i)] = (kv[j], pos[j], float(meta.t_start[j]))
        rows += [(cache[(h.level, i)][2], order, cache[(h.level, i)]) for i in ids]
    rows.sort(key=lambda r: (r[0], r[1]))
    if not rows:
        lay = llm.layout
        empty = torch.empty(lay.num_kv_heads, 0, lay.head_dim, dtype=llm.dtype, device=llm.device)
        return empty, empty
    kv = torch.cat([r[2][0][layer].to(llm.device) for r in rows], dim=2)  # [2, Hk, C, D]
    codes = torch.cat([r[2][1].to(llm.device) for r in rows])
    block = torch.repeat_interleave(torch.arange(len(rows), device=llm.device),
                                    torch.tensor([r[2][1].numel() for r in rows], device=llm.device))
    new, _ = llm.timeline(codes, block, start)
    return rerotate(llm, kv[0], codes, new), kv[1]


def question_probe(llm, prefix: PrefixKV, question: str, backend, context_tokens: int) -> Callable:
    """What :attr:`mukv.blocks.Query.probe` calls: ``probe()`` the question's per-layer queries after
    the system prompt; ``probe(choose)`` the same with the question run through each layer's own
    blocks (``choose(layer, queries) -> hits``; ``context_tokens`` tokens per layer)."""

    def probe(choose=None):
        if choose is None:
            return question_queries(llm, prefix, question)
        cache: dict = {}
        return question_queries(llm, prefix, question,
                                lambda y, q: layer_context(llm, backend, choose(y, q), y, prefix.length, cache),
                                context_tokens)

    return probe
