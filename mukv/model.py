"""The language-model side of a Video-LLM, written once for transformers decoders.

:class:`HFVideoLLM` implements everything a model adapter needs except
:meth:`~mukv.interfaces.ModelAdapter.encode_frames`:

* the system prompt's KV (computed once per session),
* batched prefill of blocks after the system prompt, returning every layer's
  KV and the last layer's attention column sums: only the last layer's
  attention is computed explicitly, every other layer stays on sdpa,
* the query vector of a question and greedy decoding from an assembled cache
  with explicit positions (:class:`~mukv.question_time.QuestionForwards`, in
  :mod:`mukv.question_time`).

At question time (query vector, answer prompt, answer tokens) the forwards run
over fixed KV workspaces (:class:`StaticDecoder`) and, on CUDA, are captured
once as CUDA graphs and replayed: a question costs a few graph replays instead
of thousands of kernel launches from Python. Set
:attr:`HFVideoLLM.static_decode` to ``False`` for the plain eager path.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

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
from .question_time import QuestionForwards, _sync, _TextStream  # noqa: E402,F401


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


class HFVideoLLM(QuestionForwards, ModelAdapter):
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
        self._init_question_time()

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
