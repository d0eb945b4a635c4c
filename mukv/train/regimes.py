"""One training step's logits in the three regimes, (a) ``full``, (b) ``frames`` and
(c) ``mukv`` (see :mod:`mukv.train`), from one encoding of the clips; the questions'
token ids; the answer loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..config import MukvConfig
from .forward import (EvidenceAttention, MidCapture, _cat_kv, _take, answer_logits, encode, prefill, prefix_kv,
                      query_vectors)
from .memory import _Level, level_memory, mukv_context, retrieval_loss, retrieve

REGIMES: tuple[str, ...] = ("full", "frames", "mukv")


@dataclass
class QuestionBatch:
    """Token ids of a batch of questions.

    Attributes:
        ids: ``[Q, N]`` answer prompt + answer word + end token, right-padded.
        at: ``[Q, 2]`` positions whose next-token logits predict the answer and the end token.
        targets: ``[Q, 2]`` answer word id, end token id.
        query_ids: ``[Q, M]`` query-template ids (right-padded), ``query_len`` ``[Q]``.
    """

    ids: torch.Tensor
    at: torch.Tensor
    targets: torch.Tensor
    query_ids: torch.Tensor
    query_len: torch.Tensor


def encode_questions(adapter, questions: Sequence[str], answers: Sequence[str] | None = None,
                     device: torch.device | str = "cpu") -> QuestionBatch:
    """Tokenize questions with the adapter's templates (answers optional: at evaluation
    the answer slot holds a pad token and only the first logits row matters)."""
    tok = adapter.tokenizer
    eos = tok.eos_token_id
    pad = tok.pad_token_id
    rows, at, targets, qrows = [], [], [], []
    for i, q in enumerate(questions):
        prompt = tok(adapter.answer_template.format(question=q), add_special_tokens=False)["input_ids"]
        if answers is not None:
            a = tok(answers[i], add_special_tokens=False)["input_ids"]
            if len(a) != 1:
                raise ValueError(f"answer {answers[i]!r} is not one token of the tokenizer")
            a = a[0]
        else:
            a = pad
        rows.append(prompt + [a])
        at.append([len(prompt) - 1, len(prompt)])
        targets.append([a, eos])
        qrows.append(tok(adapter.query_template.format(question=q), add_special_tokens=False)["input_ids"])

    def pad_rows(rs):
        n = max(len(r) for r in rs)
        return torch.tensor([r + [pad] * (n - len(r)) for r in rs], dtype=torch.long, device=device)

    return QuestionBatch(pad_rows(rows), torch.tensor(at, device=device), torch.tensor(targets, device=device),
                         pad_rows(qrows), torch.tensor([len(r) for r in qrows], device=device))


@dataclass
class RegimeOptions:
    """What a step computes.

    Attributes:
        regimes: subset of :data:`REGIMES`.
        offset_prob: probability that a question of regimes (b)/(c) starts its
            answer prompt past the context end (a long stream's answer sits
            thousands of positions after the blocks' positions).
        max_offset: largest such extra offset.
    """

    regimes: tuple[str, ...] = REGIMES
    offset_prob: float = 0.5
    max_offset: int = 16384


def memory_logits(adapter, levels: list[_Level], config: MukvConfig, frames: torch.Tensor, clip: torch.Tensor,
                  qb: QuestionBatch, opts: RegimeOptions, generator: torch.Generator | None = None,
                  visual: torch.Tensor | None = None, hidden: dict[str, torch.Tensor] | None = None,
                  evidence: torch.Tensor | None = None, attn_heads: tuple[tuple[int, ...], int] | None = None,
                  masses: dict[str, torch.Tensor] | None = None, mid: MidCapture | None = None,
                  retrieval: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Logits ``[Q, 2, V]`` (answer word, end token) for every regime in ``opts``,
    from one encoding of the clips (``visual``, computed here if not given).
    Gradients flow when grad mode is on. With ``hidden`` (a dict), the final
    hidden states of the visual tokens are stored there (``"full"``: ``[B, F * T, E]``,
    ``"frames"``: ``[B * F, T, E]``) for the auxiliary perception loss. With
    ``evidence`` (bool ``[Q, F * T]``, :func:`evidence_mask` flattened),
    ``attn_heads`` (layers, heads) and ``masses`` (a dict), the answer position's
    attention mass on the evidence (:class:`EvidenceAttention`) of regimes (a)
    and (b), whose memory keeps every visual token in clip order, is stored there.
    With ``mid``, the whole-clip regime's visual tokens (``"visual"``, ``[B, F * T, E]``)
    and answer positions (``"answer"``, ``[Q, E]``) entering ``mid.layer`` are recorded.
    With ``retrieval`` (a dict holding ``"spans"``, ``[Q, 2]``), regime (c) also puts
    :func:`retrieval_loss` there (``"loss"``, ``"stats"``), its query vectors computed
    with gradients."""
    dev = frames.device
    if visual is None:
        visual = encode(adapter, frames)  # [B, F, T, E]
    b, f, t, e = visual.shape
    prefix = prefix_kv(adapter, config.generation.system_prompt)
    p = prefix[0][0].shape[2]
    system = config.generation.system_prompt
    ids = adapter.tokenize(adapter.default_system_prompt if system is None else system).to(dev)
    q = clip.shape[0]
    out: dict[str, torch.Tensor] = {}

    def capture() -> EvidenceAttention | None:
        if evidence is None or attn_heads is None or masses is None:
            return None
        ev = torch.cat([torch.zeros(q, p, dtype=torch.bool, device=dev), evidence.to(dev)], dim=1)
        return EvidenceAttention(attn_heads[0], attn_heads[1], ev, qb.at[:, 0])

    def offsets() -> torch.Tensor:
        if opts.offset_prob <= 0 or not torch.is_grad_enabled():
            return torch.zeros(q, dtype=torch.long, device=dev)
        u = torch.rand(q, generator=generator, device="cpu")
        extra = torch.randint(0, opts.max_offset + 1, (q,), generator=generator, device="cpu")
        return torch.where(u < opts.offset_prob, extra, torch.zeros_like(extra)).to(dev)

    if "full" in opts.regimes:
        hs: list[torch.Tensor] | None = [] if hidden is not None else None
        if mid is not None:
            mid.key = "visual"
        kv, _ = prefill(adapter, prefix, visual.reshape(b, f * t, e), hidden=hs, prefix_ids=ids)
        if mid is not None:
            mid.store["visual"] = mid.store["visual"][:, -f * t:]
            mid.key = "answer"
        if hs:
            hidden["full"] = hs[0]
        ctx = _cat_kv([[(k.expand(q, -1, -1, -1), v.expand(q, -1, -1, -1)) for k, v in prefix], _take(kv, clip)])
        start = torch.full((q,), p + f * t, dtype=torch.long, device=dev)
        cap = capture()
        out["full"] = answer_logits(adapter, ctx, qb.ids, start, qb.at, cap)
        if mid is not None:
            h = mid.store["answer"]
            mid.store["answer"] = h[torch.arange(q, device=dev), qb.at[:, 0]]
            mid.key = None
        if cap is not None:
            masses["full"] = cap.mass
        del kv, ctx
    frame_level = next((lv for lv in levels if lv.level.frames == 1 and lv.split.shape == (1, t)), None)
    frames_pre = None
    if "frames" in opts.regimes or "mukv" in opts.regimes:
        need_att = "mukv" in opts.regimes and frame_level is not None and frame_level.kept < t
        hs = [] if hidden is not None else None
        frames_pre = prefill(adapter, prefix, visual.reshape(b * f, t, e), attention=need_att, hidden=hs,
                             prefix_ids=ids)
        if hs:
            hidden["frames"] = hs[0]
    if "frames" in opts.regimes:
        kv = frames_pre[0]
        mem = [(k.reshape(b, f, *k.shape[1:]).transpose(1, 2).reshape(b, k.shape[1], f * t, k.shape[3]),
                v.reshape(b, f, *v.shape[1:]).transpose(1, 2).reshape(b, v.shape[1], f * t, v.shape[3])) for k, v in kv]
        ctx = _cat_kv([[(k.expand(q, -1, -1, -1), v.expand(q, -1, -1, -1)) for k, v in prefix], _take(mem, clip)])
        start = p + f * t + offsets()
        cap = capture()
        out["frames"] = answer_logits(adapter, ctx, qb.ids, start, qb.at, cap)
        if cap is not None:
            masses["frames"] = cap.mass
        del mem, ctx
    if "mukv" in opts.regimes:
        memories = []
        for lv in levels:
            if f // lv.level.frames == 0:
                continue
            reuse = frames_pre if lv is frame_level else None
            memories.append(level_memory(adapter, prefix, visual, lv, reuse))
        if retrieval is not None:
            qv = query_vectors(adapter, prefix, qb.query_ids, qb.query_len)
            retrieval["loss"], retrieval["stats"] = retrieval_loss(
                memories, qv, clip, retrieval["spans"].to(dev), retrieval.get("tau", 0.1))
            qv = qv.detach()
        else:
            with torch.no_grad():
                qv = query_vectors(adapter, [(k.detach(), v.detach()) for k, v in prefix], qb.query_ids,
                                   qb.query_len)
        with torch.no_grad():
            chosen = retrieve(memories, config, qv, clip)
        ctx = mukv_context(prefix, memories, chosen, clip)
        start = ctx[0][0].shape[2] + offsets()
        out["mukv"] = answer_logits(adapter, ctx, qb.ids, start, qb.at)
    return out


def loss_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the answer word and the end token; and per-row correctness of the answer word."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    correct = logits[:, 0].argmax(-1) == targets[:, 0]
    return loss, correct
