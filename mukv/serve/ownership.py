"""Streams shared by several servers of one store (engine thread): readers kept current, a writer
that lost its lease demoted to a reader, a stream whose writer died taken over, new streams found.

:class:`StreamOwnership` is a part of :class:`~mukv.serve.engine.Engine`, apart because who writes
which stream is a responsibility of its own; the engine's loop calls :meth:`~StreamOwnership._look`
every ``refresh_s`` seconds. It reads the engine's ``config``, ``model``, ``server_name``,
``backend_options`` and stream table (``_all``, ``_streams`` under ``_lock``, ``_deleted``,
``_probes``) and opens streams through ``_open_existing`` and ``_served``.
"""

from __future__ import annotations

import logging
import time
import warnings

from ..errors import MukvError
from . import adapter
from .stream import ServedStream

log = logging.getLogger(__name__)


class StreamOwnership:
    """Who writes each stream of the store, kept current by :class:`~mukv.serve.engine.Engine`."""

    def _demote(self, s: ServedStream) -> None:
        """A writer that lost its stream to another server goes on as a reader."""
        try:
            s.session.close()
        except MukvError:
            pass
        if s.queue is not None:
            s.queue.close()
            s.queue.clear()
        try:
            s.session = adapter.open_reader(self.config.store, s.id, self.model, self.backend_options)
        except MukvError as exc:
            s.failed, s.error = True, adapter.describe(exc)
            return
        s.update()  # the store's numbers first: a status read between these lines never shows the role
        s.owner, s.source = adapter.writer_of(s.session), None  # of a reader with the lost writer's numbers
        s.role = "reader"

    def _refresh(self, s: ServedStream) -> None:
        try:
            adapter.refresh(s.session)
            s.update()
            s.owner = adapter.writer_of(s.session)
        except MukvError as exc:
            s.error = adapter.describe(exc)

    def _look(self) -> None:
        """Refresh readers, record gaps of idle writers, find new streams, take over orphaned ones."""
        for s in self._all():
            if s.role == "writer":
                if adapter.lease_lost(s.session):
                    self._demote(s)
                    continue
                if s.queue is not None and not s.failed:
                    s.queue.expire()
                    if not s.queue.frames:
                        gap = s.queue.pop_gap()
                        if gap is not None:
                            try:
                                s.record_gap(gap)
                            except MukvError as exc:
                                s.error = adapter.describe(exc)
                    if time.monotonic() - s.refreshed > self.config.refresh_s:
                        s.update()
            elif s.role == "reader":
                self._refresh(s)
                self._try_takeover(s)
        known = {s.id for s in self._all()}
        for sid in adapter.stream_ids(self.config.store, self.backend_options):
            if sid not in known and sid not in self._deleted:
                self._open_existing(sid)

    def _try_takeover(self, s: ServedStream) -> None:
        """Become the writer of a stream whose writer is gone (a dead server's lease expired)."""
        files = getattr(s.session.backend, "files", None)
        if files is None:
            return
        if files.remote:
            from ..backends.disk.lease import StreamLease

            o = self.config.backend_options
            probe = self._probes.get(s.id)
            if probe is None:
                probe = self._probes[s.id] = StreamLease(files, f"streams/{s.id}.json", o.get("lease_ttl", 30.0),
                                                         self.server_name, o.get("clock_skew", 10.0))
            if not probe.try_acquire():
                return
            probe.hand_over()  # the writer session's backend takes the lease from this owner at once
            self._probes.pop(s.id, None)
        else:
            from ..backends.disk.verify import writer_active

            if writer_active(files, s.id):
                return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                session = adapter.open_writer(self.config.store, s.id, self.model, self.backend_options,
                                              thumbnails=self.config.thumbnails)
            except MukvError as exc:
                s.error = adapter.describe(exc)
                return
        if not adapter.is_writer(session):
            session.close()
            return
        log.warning("stream %s: taken over (its writer is gone)", s.id)
        old = s.session
        new = self._served(s.id, session)
        with self._lock:
            self._streams[s.id] = new
        try:
            old.close()
        except MukvError:
            pass
