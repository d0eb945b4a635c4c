"""The question-time half of a transformers Video-LLM: a question's query vector and the greedy
answer from an assembled context.

:class:`QuestionForwards` is mixed into :class:`mukv.model.HFVideoLLM` (which holds the prefill
half); it reads the adapter's ``tokenizer``, ``language_model``, ``lm_head``, ``device``,
``stop_ids``, ``query_template``, ``answer_template`` and :meth:`~mukv.model.HFVideoLLM.tokenize`.
Its forwards run over fixed KV workspaces (:class:`~mukv.static_decode.StaticDecoder`) and, on
CUDA, are captured once as CUDA graphs and replayed; :attr:`QuestionForwards.static_decode`
``False`` runs them eagerly over a transformers cache.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import torch

from .attention import _Causal
from .kvcache import PrefixKV, kv_to_cache
from .static_decode import StaticDecoder, _bucket


class QuestionForwards:
    """Query vectors and greedy answers of a decoder language model (the question-time forwards)."""

    #: Question-time forwards (query vector, answer prompt, answer tokens) run
    #: over fixed KV workspaces, captured as CUDA graphs. ``None``: on for CUDA
    #: devices, off elsewhere; ``True`` on a CPU runs the same code eagerly.
    static_decode: bool | None = None
    #: Longest question or answer prompt (tokens) the static path takes; longer ones run eagerly.
    STATIC_MAX_PROMPT = 512

    def _use_static(self, n_tokens: int) -> bool:
        on = self.device.type == "cuda" if self.static_decode is None else bool(self.static_decode)
        return on and n_tokens <= self.STATIC_MAX_PROMPT

    def _init_question_time(self) -> None:
        """The workspaces' state (call from the adapter's ``__init__``)."""
        self._static_lock = threading.Lock()
        self._answer_decoder: StaticDecoder | None = None
        self._query_decoders: list[tuple[torch.Tensor, StaticDecoder]] = []

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
