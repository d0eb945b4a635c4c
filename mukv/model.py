"""The language-model side of a Video-LLM, written once for transformers decoders.

:class:`HFVideoLLM` implements everything a model adapter needs except
:meth:`~mukv.interfaces.ModelAdapter.encode_frames`:

* the system prompt's KV (computed once per session),
* batched prefill of blocks after the system prompt, returning every layer's
  KV and the last layer's attention column sums: only the last layer's
  attention is computed explicitly, every other layer stays on sdpa,
* the query vector of a question,
* greedy decoding from an assembled cache with explicit positions.

At question time (query vector, answer prompt, answer tokens) the forwards run
over fixed KV workspaces (:class:`StaticDecoder`) and, on CUDA, are captured
once as CUDA graphs and replayed: a question costs a few graph replays instead
of thousands of kernel launches from Python. Set
:attr:`HFVideoLLM.static_decode` to ``False`` for the plain eager path.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import KVLayout
from .interfaces import ModelAdapter

log = logging.getLogger(__name__)

ATTN_IMPL = "mukv_sdpa"
_capture = threading.local()
_registered = False
#: Per device type: whether sdpa with a lower-right causal bias (flash attention where
#: the device has it) matched the masked reference on its first use.
_LOWER_RIGHT_OK: dict[str, bool] = {}
#: Whether CUDA graph capture works in this process ("ok"), and why not ("error").
GRAPHS: dict[str, Any] = {}
#: Upper bound on the float32 logits one chunk of the column-sum pass may hold.
COLUMN_SUM_CHUNK_BYTES = 256 * 2**20


def _register_attention() -> None:
    """Register the "mukv_sdpa" attention function.

    Inside :class:`HFVideoLLM`'s own calls (prefill, query vector, answer), where
    the mask is known to be causal aligned to the end with no padding, every
    layer runs sdpa with a lower-right causal bias (flash attention on CUDA, no
    mask tensor, no repeated KV heads), and the one layer a prefill names also
    returns its attention column sums. Any other call (the vision tower, a user's
    own ``model.generate``) goes to transformers' sdpa unchanged.

    Under an explicit mask (``_capture.static_mask``: the static decoder, the
    sliding-window prefill of :mod:`mukv.local_window`) every layer attends under that
    mask. ``_capture.hook``, when set, sees every layer's ``(module, query, key,
    value, scaling)`` of our calls (RoPE applied): the window prefill takes its column
    sums there, :func:`mukv.local_window.question_queries` the question's queries; in a causal
    call it may return new ``(key, value)`` to attend to (the question run over each
    layer's own retrieved blocks).
    """
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        mask = getattr(_capture, "static_mask", None)
        hook = getattr(_capture, "hook", None)
        if mask is not None:
            if hook is not None:
                hook(module, query, key, value, scaling)
            return static_attention(query, key, value, mask, scaling).transpose(1, 2).contiguous(), None
        if not getattr(_capture, "causal", False) or dropout:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                          **kwargs)
        if hook is not None:  # it may put more keys and values before the call's own (a layer's own context)
            key, value = hook(module, query, key, value, scaling) or (key, value)
        out = causal_attention(query, key, value, scaling)
        if getattr(_capture, "module", None) is module:
            _capture.colsum = attention_column_sums(query, key, scaling)
        return out.transpose(1, 2).contiguous(), None

    global _attention
    _attention = attention
    AttentionInterface.register(ATTN_IMPL, attention)
    AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)
    _registered = True


_attention = None


def keep_attention_eager() -> None:
    """Run the "mukv_sdpa" attention function outside any compiled graph (``mukv.accel``'s
    compiled decoder layers): it reads per-call state (``_capture``) that a graph would bake in."""
    from transformers import AttentionInterface

    _register_attention()
    AttentionInterface.register(ATTN_IMPL, torch.compiler.disable(_attention, recursive=True))


def _masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Lower-right causal attention with an explicit mask and repeated KV heads (the portable path)."""
    length, s = query.shape[2], key.shape[2]
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    mask = torch.ones(length, s, dtype=torch.bool, device=query.device).tril(s - length)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Attention of ``query [B, Hq, L, D]`` over ``key, value [B, Hk, S, D]`` (S >= L),
    causal aligned to the end: query i sees keys ``0 .. S - L + i``. Returns ``[B, Hq, L, D]``.

    Uses sdpa with a lower-right causal bias and grouped-query heads (flash
    attention on CUDA): no mask tensor and no copies of the KV heads. The first
    call on a device is checked against the masked path; if they disagree the
    masked path is used from then on.
    """
    length, s = query.shape[2], key.shape[2]
    gqa = query.shape[1] != key.shape[1]
    if length == 1:
        return F.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=gqa)
    if length == s:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=gqa)
    dev = query.device.type
    ok = _LOWER_RIGHT_OK.get(dev)
    if ok is False:
        return _masked_attention(query, key, value, scale)
    try:
        from torch.nn.attention.bias import causal_lower_right

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=causal_lower_right(length, s), scale=scale,
                                             enable_gqa=gqa)
    except (RuntimeError, TypeError, ValueError, ImportError):
        _LOWER_RIGHT_OK[dev] = False
        return _masked_attention(query, key, value, scale)
    if ok is None:
        ref = _masked_attention(query[:1], key[:1], value[:1], scale)
        err = (out[:1].float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)
        _LOWER_RIGHT_OK[dev] = bool(err < 2e-2)
        if not _LOWER_RIGHT_OK[dev]:
            return _masked_attention(query, key, value, scale)
    return out


def static_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scale: float | None) -> torch.Tensor:
    """Attention of ``query [1, Hq, Lq, D]`` over a whole KV workspace ``key, value
    [1, Hk, C, D]`` under ``mask [Lq, C]`` (True = attend), or that mask already
    folded to ``[1, 1, rep * Lq, C]`` (boolean or additive). Returns ``[1, Hq, Lq, D]``.

    The query heads that share a KV head are folded into the query axis, so
    grouped-query attention needs no copy of the workspace and the mask is
    one ``[Hk-shared rows, C]`` matrix.
    """
    b, hq, lq, d = query.shape
    hk, c = key.shape[1], key.shape[2]
    rep = hq // hk
    q = query.reshape(b, hk, rep * lq, d)
    if mask.ndim == 2:  # [Lq, C] -> one row per folded query head
        mask = mask[None].expand(rep, lq, c).reshape(1, 1, rep * lq, c)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, lq, out.shape[-1])


def attention_column_sums(query: torch.Tensor, key: torch.Tensor, scaling: float | None,
                          chunk_bytes: int | None = None) -> torch.Tensor:
    """Column sums of one layer's causal attention, without its attention output.

    Args:
        query: ``[B, Hq, L, D]``; key: ``[B, Hk, S, D]`` (``S = past + L``; query
            i sees keys ``0 .. past + i``, grouped-query heads as in ``repeat_kv``).
        scaling: softmax scale (default ``D ** -0.5``).
        chunk_bytes: float32 logits held at once (default
            :data:`COLUMN_SUM_CHUNK_BYTES`); the query axis is cut to fit.

    Returns:
        ``colsum [B, S]`` (float32): the attention each key position receives,
        summed over queries and averaged over query heads.

    The logits are float32 (a float32 product of the bf16 inputs); each chunk
    of queries is multiplied only with the keys it can see, masked, normalised
    in place and summed. Nothing of size ``[B, Hq, L, S]`` exists at once unless
    it fits ``chunk_bytes``.
    """
    b, hq, length, d = query.shape
    hk, s = key.shape[1], key.shape[2]
    rep = hq // hk
    past = s - length
    scale = scaling if scaling is not None else d**-0.5
    budget = COLUMN_SUM_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    chunk = max(1, min(length, budget // max(1, b * hq * s * 4)))
    kf = key.float()
    colsum = torch.zeros(b, s, dtype=torch.float32, device=query.device)
    for i in range(0, length, chunk):
        c = min(chunk, length - i)
        visible = past + i + c  # keys this chunk can see
        # [B, Hq, c, D] -> [B, Hk, rep * c, D]: each KV head with the query heads it serves
        q = (query[:, :, i : i + c].float() * scale).reshape(b, hk, rep * c, d)
        logits = torch.matmul(q, kf[:, :, :visible].transpose(-1, -2))  # [B, Hk, rep * c, visible]
        rows = torch.arange(past + i, past + i + c, device=query.device)[:, None]
        hidden = torch.arange(visible, device=query.device)[None, :] > rows  # [c, visible]
        logits.view(b, hk, rep, c, visible).masked_fill_(hidden, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        colsum[:, :visible] += weights.sum(dim=2).sum(dim=1)
    return colsum.div_(hq)


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


#: Switch for the fused norms (benchmarks measure with and without).
FUSED_NORMS = True
#: RMSNorm classes whose forward is ``weight * normalise(x in float32).to(dtype)``; inside
#: mukv's own calls they run as one fused ``F.rms_norm`` kernel instead of seven.
FUSABLE_NORMS = ("Qwen2RMSNorm", "Qwen3RMSNorm", "LlamaRMSNorm", "MistralRMSNorm", "Qwen2_5_VLRMSNorm",
                 "Qwen3VLTextRMSNorm")


def _fuse_norms(module: nn.Module) -> int:
    """Give every fusable RMSNorm under ``module`` a forward that uses ``F.rms_norm``
    inside mukv's calls (``_capture.fast``) and its own code otherwise (the
    reference mode, a user's calls). Returns how many were patched."""
    if not hasattr(F, "rms_norm"):
        return 0
    count = 0
    for sub in module.modules():
        if type(sub).__name__ not in FUSABLE_NORMS or "_mukv_forward" in sub.__dict__:
            continue
        weight, eps = getattr(sub, "weight", None), getattr(sub, "variance_epsilon", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 1 or not isinstance(eps, float):
            continue
        original = sub.forward

        def forward(hidden_states, _m=sub, _orig=original):
            if FUSED_NORMS and getattr(_capture, "fast", False) and hidden_states.dtype == _m.weight.dtype:
                return F.rms_norm(hidden_states, _m.weight.shape, _m.weight, _m.variance_epsilon)
            return _orig(hidden_states)

        sub.forward = forward
        sub._mukv_forward = True
        count += 1
    return count


class _Causal:
    """Marks a call as one of ours: causal aligned to the end, no padding (see
    :func:`_register_attention`); optionally names the layer whose column sums
    to capture."""

    def __init__(self, module: nn.Module | None = None):
        self.module = module

    def __enter__(self) -> "_Causal":
        self._saved = (getattr(_capture, "causal", False), getattr(_capture, "module", None),
                       getattr(_capture, "fast", False))
        _capture.causal, _capture.module, _capture.colsum, _capture.fast = True, self.module, None, True
        return self

    def __exit__(self, *exc: Any) -> None:
        self.colsum = getattr(_capture, "colsum", None)
        _capture.causal, _capture.module, _capture.fast = self._saved
        _capture.colsum = None


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



def load_checkpoint(path, model_cls, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                    ) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load a local checkpoint directory with a transformers model class, for model adapters:
    safetensors only (never pickle), nothing downloaded; ``dtype`` defaults to bf16 on CUDA and
    float32 otherwise. Returns the model on ``device``, its tokenizer and the checkpoint's
    ``preprocessor_config.json`` as a dict (empty when it has none)."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from .errors import StoreError

    path = Path(path)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not any(path.glob("*.safetensors")):
        raise StoreError(f"{path}: no .safetensors weights found (mukv loads safetensors only, never pickle)")
    with _no_hf_progress():  # the library prints no progress bar nobody asked for
        model = model_cls.from_pretrained(str(path), dtype=dtype, use_safetensors=True,
                                          local_files_only=True).to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    pre = path / "preprocessor_config.json"
    return model, tokenizer, (json.loads(pre.read_text()) if pre.exists() else {})


@contextmanager
def _no_hf_progress() -> Iterator[None]:
    """transformers' "Loading weights" progress bar off while loading (restored after)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


#: File in a checkpoint directory with the mukv configuration the model was trained with.
MODEL_DEFAULTS_FILE = "mukv_config.json"


def read_model_defaults(path) -> dict[str, Any]:
    """The ``config`` object of a checkpoint's ``mukv_config.json`` (empty when there is none):
    mukv configuration fields the model was trained with, e.g. levels sized for its
    tokens per frame. Validated here, so a bad file is named before anything uses it.

    Raises:
        ConfigError: the file is not JSON, has no ``config`` object, or its fields are invalid.
    """
    import json
    from pathlib import Path

    from .config import MukvConfig
    from .errors import ConfigError

    file = Path(path) / MODEL_DEFAULTS_FILE
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ConfigError(f'{file}: expected a JSON object with a "config" object of mukv configuration fields')
    try:
        MukvConfig.build(data["config"])
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None
    return data["config"]


class HFVideoLLM(ModelAdapter):
    """A transformers Video-LLM: a vision encoder (subclass) + a decoder language model.

    Args:
        model: the transformers model (e.g. ``LlavaOnevisionForConditionalGeneration``).
        tokenizer: a transformers tokenizer (fast).
        language_model: the decoder stack (``model.model.language_model``).
        lm_head: the output projection.
        grid: ``(h, w)`` visual tokens per frame.
        system_prompt: default text before every block and question.
        query_template: text whose final token's key is the query vector
            (``{question}`` is replaced).
        answer_template: text between the retrieved KV and the answer.
        stop_tokens: token strings that end decoding.
        name: model id, recorded in stores.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        language_model: nn.Module,
        lm_head: nn.Module,
        grid: tuple[int, int],
        system_prompt: str,
        query_template: str,
        answer_template: str,
        stop_tokens: Iterable[str] = (),
        name: str = "",
    ):
        _register_attention()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.language_model = language_model
        self.lm_head = lm_head
        self.grid = grid
        self.default_system_prompt = system_prompt
        self.query_template = query_template
        self.answer_template = answer_template
        self.name = name
        model.set_attn_implementation(ATTN_IMPL)
        self.fused_norms = _fuse_norms(language_model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cfg = language_model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.layout = KVLayout(
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            dtype=self.dtype,
            model_id=f"{name}:{cfg.model_type}:{cfg.num_hidden_layers}x{cfg.num_key_value_heads}x{head_dim}",
        )
        self.hidden_size = cfg.hidden_size
        ids = set()
        for tok in stop_tokens:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid >= 0 and tid != getattr(tokenizer, "unk_token_id", None):
                ids.add(tid)
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        self.stop_ids = sorted(ids)
        self._embed = language_model.get_input_embeddings()
        self._static_lock = threading.Lock()
        self._answer_decoder: StaticDecoder | None = None
        self._query_decoders: list[tuple[torch.Tensor, StaticDecoder]] = []

    #: Question-time forwards (query vector, answer prompt, answer tokens) run
    #: over fixed KV workspaces, captured as CUDA graphs. ``None``: on for CUDA
    #: devices, off elsewhere; ``True`` on a CPU runs the same code eagerly.
    static_decode: bool | None = None
    #: Longest question or answer prompt (tokens) the static path takes; longer ones run eagerly.
    STATIC_MAX_PROMPT = 512

    def _use_static(self, n_tokens: int) -> bool:
        on = self.device.type == "cuda" if self.static_decode is None else bool(self.static_decode)
        return on and n_tokens <= self.STATIC_MAX_PROMPT

    # -- properties --------------------------------------------------------------------
    @property
    def tokens_per_frame(self) -> int:
        """T, visual tokens per frame."""
        return self.grid[0] * self.grid[1]

    def tokenize(self, text: str) -> torch.Tensor:
        """``LongTensor[n]`` token ids of ``text`` (no special tokens added)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``[..., E]`` input embeddings of token ids."""
        return self._embed(ids)

    # -- prefill ------------------------------------------------------------------------
    @torch.inference_mode()
    def prefix(self, system_prompt: str | None = None) -> PrefixKV:
        """KV of the system prompt (computed once per session)."""
        text = self.default_system_prompt if system_prompt is None else system_prompt
        ids = self.tokenize(text)
        if ids.numel() == 0:
            kv = torch.empty(self.layout.num_layers, 2, 1, self.layout.num_kv_heads, 0, self.layout.head_dim,
                             dtype=self.dtype, device=self.device)
            return PrefixKV(kv, ids)
        buf = self._kv_buffer(1, ids.numel())
        with _Causal():
            self.language_model(input_ids=ids[None], past_key_values=buffer_cache(buf, 0), use_cache=True)
        return PrefixKV(buf, ids)

    def _kv_buffer(self, batch: int, length: int) -> torch.Tensor:
        lay = self.layout
        return torch.empty(lay.num_layers, 2, batch, lay.num_kv_heads, length, lay.head_dim, dtype=self.dtype,
                           device=self.device)

    @torch.inference_mode()
    def prefill_blocks(
        self, prefix: PrefixKV, embeds: torch.Tensor, attention: bool = True, token_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Run a batch of blocks, each on its own after the system prompt.

        Each block attends to the system prompt and causally within itself, at
        the positions :meth:`block_positions` gives (1D RoPE: ``P .. P + L - 1``,
        as in the authors' method); blocks of a batch never see each other. One
        forward pass for the whole batch: every layer on sdpa (flash attention on
        CUDA), each layer's KV written in place into one preallocated buffer, and
        the last layer's column sums computed from its queries and keys in chunks
        (its attention weights never exist whole).

        Args:
            prefix: the system prompt's KV.
            embeds: ``[B, L, E']`` rows of :meth:`encode_frames` output (``E' = E``,
                or more where :meth:`block_inputs` splits extra features off).
            attention: also return the last layer's attention column sums.
            token_index: ``[B, L]`` each token's index in its window (frame-major,
                raster order in a frame); default ``0 .. L - 1``. M-RoPE models
                place tokens by it.

        Returns:
            ``(kv [Y, 2, B, H, L, D], attention [B, L] or None, positions)`` with
            ``positions`` the position codes the keys were rotated with: ``[L]``
            when every block shares them (1D RoPE), else ``[B, L]``
            (``positions.expand(B, -1)`` gives ``[B, L]`` either way). ``kv`` is a
            view into the prefill buffer (the system prompt's positions skipped);
            gather from it rather than copying it whole.
        """
        b, length = embeds.shape[:2]
        p = prefix.length
        if token_index is None:
            token_index = torch.arange(length, device=self.device)[None].expand(b, -1)
        buf = self._kv_buffer(b, p + length)
        buf[..., :p, :].copy_(prefix.kv.expand(-1, -1, b, -1, -1, -1))
        positions = self.block_positions(p, token_index.to(self.device))
        inputs, extra = self.block_inputs(embeds)
        last = self.language_model.layers[-1].self_attn
        with _Causal(last if attention else None) as call:
            self.language_model(
                inputs_embeds=inputs.to(self.dtype), past_key_values=buffer_cache(buf, p),
                position_ids=self.position_ids(positions.expand(b, -1)), use_cache=True, **extra,
            )
        cols = call.colsum[:, p:] if call.colsum is not None else None
        return buf[..., p:, :], cols, positions

    # -- positions (hooks; 1D RoPE here, M-RoPE in MRopeVideoLLM) -----------------------
    def block_positions(self, start: int, token_index: torch.Tensor) -> torch.Tensor:
        """Position codes of blocks prefilled after ``start`` text tokens.

        Args:
            start: P, the system prompt's length.
            token_index: ``[B, L]`` each token's index in its window.

        Returns:
            ``[L]`` (shared by every block) or ``[B, L]`` int64 codes (see
            :mod:`mukv.rope`); 1D RoPE: ``start .. start + L - 1``.
        """
        return torch.arange(start, start + token_index.shape[-1], device=self.device)

    def position_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """What the decoder's ``position_ids`` takes for ``codes [B, L]``: ``[B, L]``
        for 1D RoPE (M-RoPE: ``[3, B, L]``). Text positions are always passed
        as ``[B, L]`` (M-RoPE decoders repeat them on every row)."""
        return codes

    def block_inputs(self, embeds: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Split block rows ``[B, L, E']`` into the decoder's ``inputs_embeds [B, L, E]``
        and extra keyword arguments of its forward (Qwen3-VL: DeepStack
        features). Default: the rows as they are, nothing extra."""
        return embeds, {}

    def text_codes(self, positions: torch.Tensor) -> torch.Tensor:
        """Position codes of text tokens at ``positions`` (1D RoPE: the positions themselves)."""
        return positions

    def timeline(self, codes: torch.Tensor, block: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
        """Positions of assembled tokens on one timeline after ``start`` tokens.

        Args:
            codes: ``[C]`` stored codes of the assembled tokens, in assembled order.
            block: ``[C]`` index of each token's block in assembled order.
            start: position of the first assembled token (the system prompt's length).

        Returns:
            ``(new codes [C], next position)``; 1D RoPE: ``start .. start + C - 1``
            and ``start + C``.
        """
        n = codes.numel()
        return torch.arange(start, start + n, device=codes.device), start + n

    @torch.inference_mode()
    def query_vector(self, prefix: PrefixKV, question: str) -> torch.Tensor:
        """``[V]`` last-layer key of the question's final token, after the system prompt (float32)."""
        ids = self.tokenize(self.query_template.format(question=question))
        if self._use_static(ids.numel()) and ids.numel() > 0:
            return self._query_vector_static(prefix, ids)
        cache = kv_to_cache(prefix.kv, extra=ids.numel())
        p = prefix.length
        positions = torch.arange(p, p + ids.numel(), device=self.device)[None]
        with _Causal():
            self.language_model(input_ids=ids[None], past_key_values=cache, position_ids=positions, use_cache=True)
        key = cache.layers[-1].keys[0, :, -1, :]  # [H, D]
        return key.reshape(-1).float()

    def _query_decoder(self, prefix: PrefixKV) -> StaticDecoder:
        """The query workspace holding ``prefix``'s KV (call under ``_static_lock``).

        Sessions over one model and one system prompt compute the same prefix KV, so
        they share one workspace (and its captured graphs) whatever their number: a
        workspace is found by the prefix tensor itself or by equal contents. The 4 most
        recently used are kept."""
        found = next((i for i, (kv, _) in enumerate(self._query_decoders) if kv is prefix.kv), None)
        if found is None:
            found = next((i for i, (kv, _) in enumerate(self._query_decoders)
                          if kv.shape == prefix.kv.shape and torch.equal(kv, prefix.kv)), None)
        if found is not None:
            entry = self._query_decoders.pop(found)
            self._query_decoders.insert(0, entry)
            return entry[1]
        p = prefix.length
        dec = StaticDecoder(self, -(-(p + self.STATIC_MAX_PROMPT) // 64) * 64, graphs=self.device.type == "cuda")
        dec.kv[..., :p, :].copy_(prefix.kv)
        self._query_decoders = [(prefix.kv, dec), *self._query_decoders[:3]]
        return dec

    def _query_vector_static(self, prefix: PrefixKV, ids: torch.Tensor) -> torch.Tensor:
        p, n = prefix.length, ids.numel()
        bucket = _bucket(n)
        with self._static_lock:
            dec = self._query_decoder(prefix)
            st = dec.step(bucket, logits=False)
            st.ids.zero_()
            st.ids[0, :n].copy_(ids)
            st.slot.fill_(p)
            st.position.fill_(p)
            dec.run(st)
            return dec.kv[-1, 0, 0, :, p + n - 1, :].reshape(-1).float()

    # -- decoding -----------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self, context: torch.Tensor, question: str, max_new_tokens: int, start_position: int | None = None,
        on_token: Callable[[str], None] | None = None,
    ) -> tuple[str, list[int], dict[str, float]]:
        """Greedy answer to ``question`` from an assembled context.

        The context is copied once into a cache buffer with room for the prompt
        and the answer; prompt and answer tokens are then written in place.

        Args:
            context: ``[Y, 2, 1, H, C, D]`` KV of the system prompt + retrieved blocks.
            question: the question.
            max_new_tokens: decoding budget.
            start_position: RoPE position of the first prompt token (default C).
            on_token: called with each new piece of the answer's text as it is decoded (the pieces,
                joined, are the answer before its trailing whitespace is stripped).

        Returns:
            ``(text, token ids, timings)`` with timings "prefill" (answer prompt),
            "first_token" and "generate" in seconds.
        """
        timings: dict[str, float] = {}
        ids = self.tokenize(self.answer_template.format(question=question))
        if self._use_static(ids.numel()) and ids.numel() > 0:
            return self._generate_static(context, ids, max_new_tokens, start_position, on_token)
        emit = _TextStream(self.tokenizer, on_token)
        t0 = time.perf_counter()
        cache = kv_to_cache(context, extra=ids.numel() + max_new_tokens)
        pos = context.shape[4] if start_position is None else start_position
        positions = torch.arange(pos, pos + ids.numel(), device=self.device)[None]
        out: list[int] = []
        stop = set(self.stop_ids)
        with _Causal():
            hidden = self.language_model(
                input_ids=ids[None], past_key_values=cache, position_ids=positions, use_cache=True
            ).last_hidden_state[:, -1]
            pos += ids.numel()
            token = int(self.lm_head(hidden).argmax(-1))
            _sync(self.device)
            timings["prefill"] = timings["first_token"] = time.perf_counter() - t0
            while token not in stop and len(out) < max_new_tokens:
                out.append(token)
                emit(out)
                if len(out) == max_new_tokens:
                    break
                step = torch.tensor([[token]], device=self.device)
                hidden = self.language_model(
                    input_ids=step, past_key_values=cache, position_ids=torch.tensor([[pos]], device=self.device),
                    use_cache=True,
                ).last_hidden_state[:, -1]
                pos += 1
                token = int(self.lm_head(hidden).argmax(-1))
        _sync(self.device)
        timings["generate"] = time.perf_counter() - t0
        text = self.tokenizer.decode(out, skip_special_tokens=True).strip()
        return text, out, timings


    def _generate_static(self, context: torch.Tensor, ids: torch.Tensor, max_new_tokens: int,
                         start_position: int | None, on_token: Callable[[str], None] | None = None
                         ) -> tuple[str, list[int], dict[str, float]]:
        """:meth:`generate` over a KV workspace with replayed steps (CUDA graphs on CUDA).

        The context is copied into the workspace; the answer prompt, padded to a
        power-of-two bucket, runs as one step (padding after the prompt cannot
        affect it, and decoding overwrites the padding's slots before reading
        them); each answer token is one step."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        c, n = context.shape[4], ids.numel()
        bucket = _bucket(n)
        need = c + bucket + max_new_tokens
        stop = set(self.stop_ids)
        out: list[int] = []
        emit = _TextStream(self.tokenizer, on_token)
        with self._static_lock:
            dec = self._answer_decoder
            if dec is None or dec.capacity < need:
                self._answer_decoder = None
                dec = self._answer_decoder = StaticDecoder(self, -(-need * 5 // 4 // 4096) * 4096,
                                                           graphs=self.device.type == "cuda")
            dec.kv[..., :c, :].copy_(context)
            pos = c if start_position is None else start_position
            first = dec.step(bucket)
            first.ids.zero_()
            first.ids[0, :n].copy_(ids)
            first.slot.fill_(c)
            first.position.fill_(pos)
            first.last.fill_(n - 1)
            dec.run(first)
            token = int(first.token)
            timings["prefill"] = timings["first_token"] = time.perf_counter() - t0
            step, prev = dec.step(1), first
            slot, pos = c + n, pos + n
            while token not in stop and len(out) < max_new_tokens:
                out.append(token)
                emit(out)
                if len(out) == max_new_tokens:
                    break
                step.ids.view(-1).copy_(prev.token)
                step.slot.fill_(slot)
                step.position.fill_(pos)
                dec.run(step)
                token = int(step.token)
                prev, slot, pos = step, slot + 1, pos + 1
        _sync(self.device)
        timings["generate"] = time.perf_counter() - t0
        text = self.tokenizer.decode(out, skip_special_tokens=True).strip()
        return text, out, timings


class MRopeVideoLLM(HFVideoLLM):
    """An :class:`HFVideoLLM` whose decoder uses multimodal RoPE (Qwen2.5-VL, Qwen3-VL).

    Visual tokens are placed by :attr:`mrope` (a :class:`~mukv.rope.MRopeLayout`):
    stored position codes pack each token's ``(origin, dt, h, w)``, the decoder
    gets ``[3, B, L]`` rows (temporal, height, width), re-rotation turns each
    frequency pair by the delta of its own row, and the assembled timeline
    lays retrieved blocks out as the frames of one video. Text (system prompt,
    question, answer) keeps 1D positions repeated on the three rows, as Qwen
    does. Subclasses set :attr:`mrope` in ``__init__``.
    """

    mrope: Any = None  # MRopeLayout

    def block_positions(self, start: int, token_index: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` M-RoPE codes of the blocks' visual tokens (see :meth:`MRopeLayout.block_codes`)."""
        return self.mrope.block_codes(start, token_index).to(self.device)

    def position_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """``[3, B, L]`` rows (temporal, height, width) of codes ``[B, L]``."""
        from .rope import mrope_rows

        return mrope_rows(codes)

    def text_codes(self, positions: torch.Tensor) -> torch.Tensor:
        """Codes of text tokens: the position on all three rows (origin = position, no offsets)."""
        from .rope import pack_mrope

        zero = torch.zeros_like(positions)
        return pack_mrope(positions, zero, zero, zero, check=False)

    def timeline(self, codes: torch.Tensor, block: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
        """Assembled units as consecutive frames of one video (see :meth:`MRopeLayout.timeline`)."""
        return self.mrope.timeline(codes, block.to(codes.device), start)

    def rerotate(self, keys: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Move ``keys [..., C, D]`` from codes ``old [C]`` to codes ``new [C]``, row by row."""
        from .rope import mrope_rows, rerotate_rows

        delta = mrope_rows(new.to(keys.device)) - mrope_rows(old.to(keys.device))  # [3, C]
        return rerotate_rows(self.language_model.rotary_emb, keys, delta)


class _TextStream:
    """Hands the new text of a growing answer to ``on_token``, piece by piece.

    Each call decodes the answer so far and passes on what was added since the last piece;
    a piece ending in an incomplete UTF-8 sequence waits for the next token. Leading
    whitespace is dropped (as :meth:`HFVideoLLM.generate` strips its answer)."""

    def __init__(self, tokenizer: Any, on_token: Callable[[str], None] | None):
        self.tokenizer, self.on_token, self.sent = tokenizer, on_token, 0

    def __call__(self, ids: list[int]) -> None:
        if self.on_token is None:
            return
        text = self.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd") or len(text) <= self.sent:
            return
        piece, self.sent = text[self.sent:], len(text)
        self.on_token(piece)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
