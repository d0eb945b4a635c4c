"""Question-time forwards over fixed KV workspaces, captured once as CUDA graphs and replayed.

:class:`StaticDecoder` holds one workspace per capacity and one :class:`StaticStep` per
forward length; on CUDA each step is captured as a CUDA graph on its first use (a failure
falls back to eager replay for the rest of the process, recorded in
:data:`mukv.attention.GRAPHS`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from .attention import GRAPHS, _capture

if TYPE_CHECKING:
    from .model import HFVideoLLM

log = logging.getLogger(__name__)

def _static_layer_class():
    from transformers.cache_utils import DynamicLayer

    class StaticLayer(DynamicLayer):
        """A cache layer over a fixed workspace ``[1, H, C, D]``: ``update`` writes the
        new tokens at the workspace slots ``slots [Lq]`` (a device tensor) and
        returns the whole workspace; :func:`static_attention` masks what is unwritten."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor):
            super().__init__()
            self.keys, self.values, self._slots = keys, values, slots
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:
            return None

        def update(self, key_states, value_states, *args, **kwargs):
            self.keys.index_copy_(2, self._slots, key_states)
            self.values.index_copy_(2, self._slots, value_states)
            return self.keys, self.values

    return StaticLayer


_STATIC_LAYER = None


class StaticStep:
    """One forward of ``length`` tokens over a fixed KV workspace, replayable.

    The workspace ``kv [Y, 2, 1, H, capacity, D]`` is written at slots
    ``slot .. slot + length - 1`` with RoPE positions ``position ..``; token
    ``i`` attends to every slot up to its own. Inputs (``ids``, ``slot``,
    ``position``, ``last``) and the output (``token``: the greedy next token
    after row ``last``) are fixed device tensors, so on CUDA the step is
    captured once as a CUDA graph and replayed for every question and answer
    token (no per-layer launches from Python). Elsewhere it runs eagerly.

    Args:
        llm: the model adapter.
        kv: the workspace, shared by the steps of one :class:`StaticDecoder`.
        length: tokens per step (1 for decoding, a bucket for prompts).
        logits: compute the next token (``False``: only write KV).
    """

    def __init__(self, llm: "HFVideoLLM", kv: torch.Tensor, length: int, logits: bool = True):
        global _STATIC_LAYER
        if _STATIC_LAYER is None:
            _STATIC_LAYER = _static_layer_class()
        dev = kv.device
        self.llm, self.kv, self.length, self.logits = llm, kv, length, logits
        capacity = kv.shape[4]
        self.ids = torch.zeros(1, length, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.position = torch.zeros(1, dtype=torch.long, device=dev)
        self.last = torch.zeros(1, dtype=torch.long, device=dev)
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        cfg = llm.language_model.config
        self._rep = cfg.num_attention_heads // cfg.num_key_value_heads
        self._rows = torch.arange(length, device=dev)
        self._cols = torch.arange(capacity, device=dev)
        self._slots = torch.zeros(length, dtype=torch.long, device=dev)
        from transformers import DynamicCache

        self.cache = DynamicCache()
        self.cache.layers = [_STATIC_LAYER(kv[y, 0], kv[y, 1], self._slots) for y in range(kv.shape[0])]
        self.graph = None
        self.captured = False

    def _step(self) -> None:
        torch.add(self.slot, self._rows, out=self._slots)
        visible = self._cols[None, :] <= self._slots[:, None]  # [length, capacity]
        # folded once per step for every layer: one additive row per (query head in a KV group, token)
        mask = torch.zeros(self._rep, self.length, visible.shape[1], dtype=self.kv.dtype, device=self.kv.device)
        mask.masked_fill_(~visible[None], float("-inf"))
        mask = mask.reshape(1, 1, self._rep * self.length, visible.shape[1])
        positions = (self.position + self._rows)[None]
        _capture.static_mask, fast = mask, getattr(_capture, "fast", False)
        _capture.fast = True
        try:
            hidden = self.llm.language_model(input_ids=self.ids, past_key_values=self.cache, position_ids=positions,
                                             use_cache=True).last_hidden_state
        finally:
            _capture.static_mask, _capture.fast = None, fast
        if self.logits:
            h = hidden[0].index_select(0, self.last)
            self.token.copy_(self.llm.lm_head(h).argmax(-1))

    def capture(self) -> None:
        """Capture the step as a CUDA graph (after two warm-up runs on a side stream).
        The warm-up runs write the workspace at the current slots, as the first
        replay will. Capture is thread-local: other threads (a stream fed while
        another is asked) go on launching and synchronising their own work."""
        stream = torch.cuda.Stream(self.kv.device)
        stream.wait_stream(torch.cuda.current_stream(self.kv.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.kv.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._step()
        self.graph, self.captured = graph, True

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()


class StaticDecoder:
    """A KV workspace of ``capacity`` slots and the :class:`StaticStep` s over it: one
    per prompt length bucket, and one for single answer tokens.

    Args:
        llm: the model adapter.
        capacity: workspace slots (context + prompt bucket + answer).
        graphs: capture CUDA graphs (CUDA only).
    """

    def __init__(self, llm: "HFVideoLLM", capacity: int, graphs: bool):
        self.llm, self.capacity, self.graphs = llm, capacity, graphs
        self.kv = llm._kv_buffer(1, capacity).zero_()
        self.steps: dict[tuple[int, bool], StaticStep] = {}

    def step(self, length: int, logits: bool = True) -> StaticStep:
        key = (length, logits)
        st = self.steps.get(key)
        if st is None:
            st = self.steps[key] = StaticStep(self.llm, self.kv, length, logits)
        return st

    def run(self, st: StaticStep) -> None:
        if self.graphs and not st.captured and GRAPHS.get("ok", True):
            try:
                st.capture()  # the warm-up runs leave the step's result in place: no replay needed now
                return
            except Exception as exc:  # a model whose forward cannot be captured: replay eagerly from now on
                GRAPHS["ok"] = False
                GRAPHS["error"] = f"{type(exc).__name__}: {exc}"
                log.warning("CUDA graph capture failed (%s); decoding without graphs", GRAPHS["error"])
                st.graph, st.captured = None, False
        st.run()


def _bucket(n: int, smallest: int = 8) -> int:
    """The power of two >= ``n`` (at least ``smallest``)."""
    b = smallest
    while b < n:
        b *= 2
    return b
