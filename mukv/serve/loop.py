"""The engine's loop (engine thread): questions first, control jobs, then one ingest step of many
streams, and a look at the store every ``refresh_s`` seconds (see :mod:`mukv.serve.engine`).

:class:`EngineLoop` is a part of :class:`~mukv.serve.engine.Engine`, apart because the loop's order
(questions, control, ingest, look) and what happens inside a step (questions answered between its
stages, asked streams withdrawn from it, each stream's result booked) are one responsibility of
their own. It reads the engine's queues (``_asks``, ``_control``, ``_kick``), its ``scheduler``,
``config`` and ``metrics``, and calls :meth:`~mukv.serve.ownership.StreamOwnership._look` and
``_demote``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..errors import StoreError
from . import adapter
from .scheduler import StepResult

log = logging.getLogger(__name__)


class EngineLoop:
    """The loop of :class:`~mukv.serve.engine.Engine` and what it does inside an ingest step."""

    def _run(self) -> None:
        next_look = time.monotonic() + self.config.refresh_s
        answered = 0  # questions answered since the last ingest step
        while not self._stop_loop:
            job = None
            if self._asks and answered < self.config.questions_per_step:
                job = self._asks.popleft()
                answered += 1
            elif self._control:
                job = self._control.popleft()
            if job is not None:
                job.run()
                continue
            works = self.scheduler.plan(self._all(), force=self.state == "stopping")
            answered = 0
            if works:
                t0 = time.monotonic()
                busy = {w.stream.id for w in works}
                self.scheduler.batcher.withdraw = lambda sessions: self._withdraw_asked(sessions, works, busy)
                self.scheduler.batcher.between_stages = lambda: self._answer_between(busy)
                self.scheduler.run(works, self._step_done)
                self.metrics.step_seconds.observe(time.monotonic() - t0)
                self.metrics.batch.observe(sum(int(w.frames.shape[0]) for w in works))
                continue
            now = time.monotonic()
            if now >= next_look and self.state == "ok":
                try:
                    self._look()
                except Exception:  # noqa: BLE001 - the loop must go on
                    log.exception("looking at the store failed")
                next_look = time.monotonic() + self.config.refresh_s
                continue
            due = self.scheduler.due_in(self._all(), now)
            self._kick.wait(max(0.0, min(0.5, next_look - now, 0.5 if due is None else due)))
            self._kick.clear()

    def _withdraw_asked(self, sessions: list[Any], works: list[Any], busy: set[str]) -> list[Any]:
        """Inside an ingest step, at a stage boundary (engine thread): the step's sessions that
        waiting questions are on leave the step (``withdraw_asked``), rolled back, their frames back
        in front of their queues; ``busy`` forgets them, so :meth:`_answer_between` answers them.
        Frames given back once are stored by the next step that takes them (never given back twice)."""
        cfg = self.scheduler.config
        if not (cfg.lend_between_stages and cfg.withdraw_asked and self._asks):
            return []
        asked = {job.stream for job in list(self._asks)[: self.config.questions_per_step]}
        by_session = {id(w.stream.session): w.stream.id for w in works if not w.stays}
        out = [s for s in sessions if by_session.get(id(s)) in asked]
        busy.difference_update(by_session[id(s)] for s in out)
        return out

    def _answer_between(self, busy: set[str]) -> None:
        """Inside an ingest step, between its stages (engine thread): answer up to
        ``questions_per_step`` waiting questions on streams the step does not hold (any longer), in
        arrival order; questions on the step's own streams keep their place and wait for its commit."""
        if not self.scheduler.config.lend_between_stages or not self._asks:
            return
        budget, kept = self.config.questions_per_step, []
        while budget > 0:
            try:
                job = self._asks.popleft()
            except IndexError:
                break
            if job.stream in busy:
                kept.append(job)
                continue
            job.run()
            budget -= 1
        self._asks.extendleft(reversed(kept))  # back in front, in their order

    def _step_done(self, r: StepResult) -> None:
        s = r.stream
        if r.stored:
            s.stored += r.frames
            s.update()  # about a millisecond: the status is current once the step is done
            s.error = None
            return
        exc = r.error
        s.error = adapter.describe(exc)
        if adapter.lease_lost(s.session):
            log.warning("stream %s: %s", s.id, s.error)
            s.queue.dropped += r.frames
            self._demote(s)
        elif isinstance(exc, StoreError) and getattr(s.session.backend, "_failure", None):
            log.error("stream %s: writing failed: %s", s.id, s.error)
            s.failed = True  # the store refuses more writes until the stream is reopened
            s.queue.dropped += r.frames
            s.queue.clear()
        else:  # refused frames: nothing of them is stored (a feed is a transaction); they make a gap
            log.warning("stream %s: frames refused: %s", s.id, s.error)
            s.queue.lost(r.t_start, r.t_end, r.frames)
