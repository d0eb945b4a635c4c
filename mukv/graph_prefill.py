"""Block prefill replayed from CUDA graphs (the ``graph_prefill`` acceleration of :mod:`mukv.accel`).

A 0.5B model's level forwards are many short kernels: the GPU waits for the host to launch them
(78-84% busy in ``benchmarks/profile_ingest.py``). :class:`GraphPrefill` records one forward per
batch shape as a CUDA graph and replays it, one launch for the whole forward.

Shapes: the batch is padded up to a few sizes, so the batch sizes a stream's chunks and the
scheduler's batches make share graphs: by default to a multiple of the largest power of two at most
an eighth of the batch (at most 12.5% more rows: 20 blocks stay 20, 83 become 88, 332 become 352),
or to a multiple of a fixed ``bucket``. A padded row is a block of zeros that no real
block sees (each block attends to the system prompt and to itself only), and what it produces is
dropped. Graphs share one memory pool; their outputs are copied out before the next replay. A shape
whose forward cannot be recorded (a model whose forward waits on the device, say) runs eagerly, with
one warning.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    """One recorded forward and its static tensors."""

    graph: Any  # torch.cuda.CUDAGraph, or None when recording is off (the padded eager path)
    embeds: torch.Tensor  # [NB, L, E'] input rows (padded)
    tokens: torch.Tensor  # [NB, L] token index per row (padded rows: 0 .. L - 1)
    plain: torch.Tensor  # [L] 0 .. L - 1, the token index of a row given none
    prefix_kv: torch.Tensor  # [Y, 2, 1, H, P, D] the system prompt the forward reads
    prefix_src: Any  # the PrefixKV whose KV prefix_kv holds now
    out: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None  # kv, column sums, positions
    failed: str | None = None  # why this shape could not be recorded (its batches then run eagerly)


class GraphPrefill:
    """``prefill_blocks`` of a model adapter through CUDA graphs, one per padded batch shape.

    Args:
        eager: the adapter's own ``prefill_blocks`` (what each graph records).
        bucket: the batch is padded up to a multiple of this many blocks; 0 (the default): of the
            largest power of two at most an eighth of the batch (:func:`padded_size`).
        max_graphs: shapes recorded at most; a batch of another shape past it runs eagerly.
        record: record CUDA graphs (``False``: run the padded batch eagerly, the same arithmetic on any
            device; for tests of the padding on a CPU).

    Called like ``prefill_blocks(prefix, embeds [B, L, E'], attention, token_index [B, L])`` and returns
    what it returns (``kv [Y, 2, B, H, L, D]``, column sums ``[B, L]`` or ``None``, positions), as new
    tensors rather than views of the graph's memory.
    """

    def __init__(self, eager: Callable[..., Any], bucket: int = 0, max_graphs: int = 32, record: bool = True):
        if not callable(eager):
            raise ConfigError(f"graph_prefill: eager must be the model's prefill function; got {type(eager).__name__}")
        for name, value in (("bucket", bucket), ("max_graphs", max_graphs)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"graph_prefill: {name} must be an integer; got {value!r}"[:200])
        if bucket < 0 or max_graphs < 1:
            raise ConfigError(f"graph_prefill: bucket must be >= 0 and max_graphs >= 1; got {bucket}, {max_graphs}")
        self.eager, self.bucket, self.max_graphs, self.record = eager, bucket, max_graphs, record
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None
        self._lock = threading.Lock()  # one replay at a time: graphs share their memory pool
        #: batches run from a recorded graph / eagerly (no graph for their shape)
        self.replays = 0
        self.eager_calls = 0

    def __call__(self, prefix: Any, embeds: torch.Tensor, attention: bool = True,
                 token_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        b, length = embeds.shape[:2]
        nb = padded_size(b, self.bucket)
        key = (nb, length, tuple(embeds.shape[2:]), embeds.dtype, embeds.device, prefix.length, bool(attention))
        with self._lock:
            g = self._graphs.get(key)
            if g is None and len(self._graphs) < self.max_graphs:
                g = self._new(key, prefix, embeds)
            if g is None or g.failed:
                self.eager_calls += 1
                return self.eager(prefix, embeds, attention=attention, token_index=token_index)
            self._fill(g, prefix, embeds, token_index)
            if g.graph is not None:
                g.graph.replay()
            elif not self.record:
                g.out = self._forward(g, attention)
            else:  # the first batch of this shape
                try:
                    g.out = self._record(g, attention)
                except Exception as exc:  # noqa: BLE001 - a forward that cannot be recorded still runs
                    g.failed = f"{type(exc).__name__}: {exc}"
                    log.warning("graph_prefill: batches of %d blocks of %d tokens run eagerly; recording their "
                                "forward failed (%s)", key[0], key[1], g.failed)
                    self.eager_calls += 1
                    return self.eager(prefix, embeds, attention=attention, token_index=token_index)
            self.replays += 1
            kv, cols, positions = g.out
            return (kv[:, :, :b].clone(), None if cols is None else cols[:b].clone(),
                    positions[:b].clone() if positions.ndim == 2 else positions.clone())

    # ------------------------------------------------------------------ internals
    def _new(self, key: tuple, prefix: Any, embeds: torch.Tensor) -> _Graph:
        nb, length = key[0], key[1]
        dev = embeds.device
        plain = torch.arange(length, device=dev)
        g = _Graph(graph=None, embeds=torch.zeros((nb, *embeds.shape[1:]), dtype=embeds.dtype, device=dev),
                   tokens=plain.repeat(nb, 1), plain=plain, prefix_kv=torch.empty_like(prefix.kv), prefix_src=None)
        self._graphs[key] = g
        return g

    def _fill(self, g: _Graph, prefix: Any, embeds: torch.Tensor, token_index: torch.Tensor | None) -> None:
        b = embeds.shape[0]
        if g.prefix_src is not prefix:
            g.prefix_kv.copy_(prefix.kv)
            g.prefix_src = prefix
        g.embeds[:b].copy_(embeds)
        g.embeds[b:].zero_()
        g.tokens[:b].copy_(g.plain if token_index is None else token_index)  # broadcast over the rows
        g.tokens[b:].copy_(g.plain)

    def _forward(self, g: _Graph, attention: bool):
        prefix = replace(g.prefix_src, kv=g.prefix_kv)
        return self.eager(prefix, g.embeds, attention=attention, token_index=g.tokens)

    def _record(self, g: _Graph, attention: bool):
        """Record the forward of ``g``'s shape as a CUDA graph (after warm-up runs on a side stream, as
        CUDA graphs need) and replay it once: this batch's own results."""
        side = torch.cuda.Stream(device=g.embeds.device)
        side.wait_stream(torch.cuda.current_stream(g.embeds.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(g, attention)
        torch.cuda.current_stream(g.embeds.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self._forward(g, attention)
        self._pool = graph.pool()
        g.graph = graph
        graph.replay()  # the recording ran nothing
        return out


def padded_size(b: int, bucket: int = 0) -> int:
    """Rows a batch of ``b`` blocks is padded to: a multiple of ``bucket``, or with ``bucket`` 0 of the
    largest power of two at most ``b / 8`` (so at most 12.5% more rows)."""
    if bucket > 0:
        step = bucket
    else:
        step = 1 << ((b // 8).bit_length() - 1) if b >= 8 else 1
    return -(-b // step) * step


#: The bucket :func:`install` uses unless given one (``benchmarks/accel_bench.py --graph-bucket``).
DEFAULT_BUCKET = 0


def require_cuda(adapter: Any) -> None:
    """:class:`ConfigError` unless ``adapter`` runs on a CUDA device (graphs are recorded there only)."""
    device = getattr(adapter, "device", torch.device("cpu"))
    if device.type != "cuda":
        raise ConfigError(f"graph_prefill records CUDA graphs; this model runs on {device}")


def install(adapter: Any, bucket: int | None = None, max_graphs: int = 32, record: bool = True) -> GraphPrefill:
    """Give ``adapter`` a :class:`GraphPrefill` as its ``prefill_blocks``; returns it. Recording needs
    a CUDA device (:class:`ConfigError` elsewhere unless ``record`` is off)."""
    if record:
        require_cuda(adapter)
    current = adapter.prefill_blocks
    if isinstance(current, GraphPrefill):
        return current
    gp = GraphPrefill(current, bucket=DEFAULT_BUCKET if bucket is None else bucket, max_graphs=max_graphs,
                      record=record)
    adapter.prefill_blocks = gp
    return gp
