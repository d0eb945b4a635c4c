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
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import KVLayout
from .interfaces import ModelAdapter

log = logging.getLogger(__name__)

# The pieces of this module that live in their own modules, importable from here as before.
from .attention import (  # noqa: E402,F401
    ATTN_IMPL, COLUMN_SUM_CHUNK_BYTES, GRAPHS, _LOWER_RIGHT_OK, _capture, _Causal, _masked_attention,
    _register_attention, attention_column_sums, causal_attention, keep_attention_eager, static_attention,
)
from .checkpoints import MODEL_DEFAULTS_FILE, _no_hf_progress, load_checkpoint, read_model_defaults  # noqa: E402,F401
from .kvcache import PrefixKV, _BufferLayer, buffer_cache, cache_to_kv, kv_to_cache  # noqa: E402,F401
from .static_decode import StaticDecoder, StaticStep, _bucket, _static_layer_class  # noqa: E402,F401


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
