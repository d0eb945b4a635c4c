"""Answering a question from a session's memory: the top-k per level, the query, retrieval,
page-in, assembly and decoding (what :meth:`mukv.session.Session.ask` runs under the session's
lock, once the question and its time window are checked).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .assembly import assemble_context, page_in
from .blocks import Answer, Query, RetrievedBlock
from .clock import iso
from .errors import EmptyMemoryError, InputError, RetrievalError
from .local_window import question_probe
from .rope import rerotate

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger(__name__)

#: the longest question ``ask`` accepts, in tokens
MAX_QUESTION_TOKENS = 2048


def answer_question(self: "Session", question: str, top_k: dict[str, int] | None, max_new_tokens: int | None,
                    window: tuple[float | None, float | None] | None, on_token: Any = None) -> Answer:
    """Retrieve, assemble and decode the answer to ``question`` for session ``self`` (its lock held,
    the question and window already checked): :meth:`mukv.session.Session.ask`'s work."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    notes: list[str] = []
    index = self.backend
    if window is not None:
        from .window import WindowedIndex, level_window

        t0 = time.perf_counter()
        index = WindowedIndex(self.backend, {lp.level.name: level_window(self.backend, lp.level.name, *window)
                                             for lp in self.levels})
        timings["window"] = time.perf_counter() - t0
    plan = plan_top_k(self, top_k, notes, index, window)
    n_q = self.model.tokenize(question).numel()
    if n_q > MAX_QUESTION_TOKENS:
        raise InputError(f"question is too long: {n_q} tokens (at most {MAX_QUESTION_TOKENS})")
    t0 = time.perf_counter()
    vector = self.model.query_vector(self.prefix, question)
    timings["query"] = time.perf_counter() - t0
    probe = question_probe(self.model, self.prefix, question, self.backend,
                           sum(plan.get(lp.level.name, 0) * lp.kept for lp in self.levels))
    query = Query(question, vector, self._stream.last_time or 0.0, self._stream.frames_seen, probe=probe)
    t0 = time.perf_counter()
    hits = self.retriever.retrieve(query, index, plan)
    timings["retrieve"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pieces = page_in(self.backend, hits, [lp.level.name for lp in self.levels], self.config.assembly.rerotate)
    fn = (lambda k, old, new: rerotate(self.model, k, old, new)) if self.config.assembly.rerotate else None
    tl = getattr(self.model, "timeline", None) if self.config.assembly.rerotate else None
    assembled = assemble_context(self.prefix.kv, pieces, self.config.assembly.order, fn, tl)
    context, order = assembled.kv, assembled.block_order
    timings["page_in"] = time.perf_counter() - t0
    budget = max_new_tokens or self.config.generation.max_new_tokens
    stream = {"on_token": on_token} if on_token is not None else {}
    text, _, gen_t = self.model.generate(context, question, budget, assembled.next_position, **stream)
    timings.update(gen_t)
    timings["total"] = time.perf_counter() - t_start
    origin = self._stream.wall_origin
    blocks = []
    share = assembled.layer_share or [1.0] * len(order)
    for (pi, r), layer_share in zip(order, share):
        p = pieces[pi]
        ts, te = float(p.meta.t_start[r]), float(p.meta.t_end[r])
        blocks.append(RetrievedBlock(
            level=p.level, block_id=int(p.ids[r]), score=float(p.scores[r]),
            frame_start=int(p.meta.frame_start[r]), frame_end=int(p.meta.frame_end[r]),
            t_start=ts, t_end=te, tokens=int(p.kv.shape[4]), wall_start=iso(ts, origin), wall_end=iso(te, origin),
            layer_share=float(layer_share),
        ))
    answer = Answer(question, text, blocks, int(context.shape[4]), timings, notes, window)
    if log.isEnabledFor(logging.INFO):
        log.info("answered in %.0f ms from %d blocks (%s), %d KV tokens", timings["total"] * 1000,
                 len(blocks), ", ".join(f"{n} {lv}" for lv, n in answer.levels().items()), answer.kv_tokens)
    if self._question_log is not None:
        self._question_log.record(answer, self.config, model=self.model.name,
                                  stream_time=self._stream.last_time or 0.0)
    return answer

def plan_top_k(self: "Session", top_k: dict[str, int] | None, notes: list[str], index: Any = None,
               window: tuple[float | None, float | None] | None = None) -> dict[str, int]:
    """Blocks to retrieve per level: ``top_k`` checked against what the index holds, else each level's
    own top-k (clamped to what is stored, with a note, unless ``retrieval.on_short_stream`` is "error")."""
    index = self.backend if index is None else index
    names = [lp.level.name for lp in self.levels]
    if top_k is not None:
        if not isinstance(top_k, dict):
            raise InputError(f"top_k must be a dict of level name -> count; got {type(top_k).__name__}")
        unknown = sorted(set(top_k) - set(names), key=repr)
        if unknown:
            raise InputError(f"top_k names unknown levels {unknown}; levels: {names}")
        for name, k in top_k.items():
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise InputError(f"top_k[{name!r}] must be a non-negative integer; got {k!r}")
    if sum(index.count(n) for n in names) == 0:
        seen = self._stream.frames_seen
        if window is not None and sum(self.backend.count(n) for n in names):
            raise EmptyMemoryError(f"nothing is stored in the window since={window[0]} until={window[1]} "
                                   "(stream seconds)")
        raise EmptyMemoryError(
            "nothing is stored yet: feed frames before asking" if seen == 0 else
            f"nothing is stored yet: {seen} frame(s) fed, no level has completed a block"
        )
    plan = {}
    for lp in self.levels:
        name = lp.level.name
        stored = index.count(name)
        if top_k is not None and name in top_k:
            k = top_k[name]
            if k > stored:
                raise RetrievalError(f"top_k[{name!r}] = {k} but only {stored} {name} block(s) are stored"
                                     + (" in the window" if window is not None else ""))
        else:
            k = lp.level.top_k
            if k > stored:
                if self.config.retrieval.on_short_stream == "error":
                    raise RetrievalError(
                        f"levels.{name}.top_k = {k} but only {stored} {name} block(s) are stored "
                        "(retrieval.on_short_stream = 'error')")
                if stored < k and k < 1_000_000:
                    notes.append(f"{name}: top-k {k} clamped to the {stored} block(s) stored"
                                 + (" in the window" if window is not None else ""))
                k = stored
        plan[name] = k
    return plan
