"""A stream as one server holds it: its session, its queue and source, its numbers."""

from __future__ import annotations

import time
from typing import Any

from . import adapter
from .queues import FrameQueue, GapRun
from .sources import SourcePuller


class ServedStream:
    """One stream of the store, held by this server as its writer or as a reader.

    The engine thread alone calls the session (feed, ask, refresh) and refreshes :attr:`numbers`;
    HTTP handlers read the numbers, the queue's counters and the source's state, never the
    session's tensors.

    Attributes:
        role: ``writer`` (this server ingests it) or ``reader`` (another server does).
        queue: frames waiting (writers only).
        source: the source pulled, if any.
        numbers: frames, times and bytes as of the last ingest step or refresh.
    """

    def __init__(self, stream_id: str, session: Any, role: str, queue: FrameQueue | None = None):
        self.id = stream_id
        self.session = session
        self.role = role
        self.queue = queue
        self.source: SourcePuller | None = None
        self.error: str | None = None
        self.failed = False
        self.busy = False
        self.owner: str | None = None
        self.numbers: dict[str, Any] = {}
        self.gaps: list[dict[str, Any]] = []
        self.stored = 0  # frames stored by this server
        self.gaps_recorded = 0  # gaps recorded by this server
        self.refreshed = 0.0
        self.update()

    def update(self) -> None:
        """Read the session's numbers (engine thread)."""
        self.numbers = adapter.stream_numbers(self.session)
        self.gaps = adapter.gaps(self.session)
        self.refreshed = time.monotonic()

    def record_gap(self, gap: GapRun) -> None:
        """Record a run of dropped frames in the stream (committed with the next feed or commit)."""
        adapter.record_gap(self.session, gap.t_start, gap.t_end, gap.frames)
        self.gaps_recorded += 1
        self.gaps = adapter.gaps(self.session)

    @property
    def state(self) -> str:
        if self.failed:
            return f"failed: {self.error}"
        if self.busy:
            return "ingesting"
        if self.source is not None:
            if self.source.state == "source failed":
                return f"source failed: {self.source.error}"
            if self.source.state == "pulling" and self.queue is not None and self.queue.frames:
                return "ingesting"
            return self.source.state
        if self.queue is not None and self.queue.frames:
            return "ingesting"
        return "idle"

    def status(self) -> dict[str, Any]:
        """The stream's status (``protocol.StreamStatus``)."""
        q = self.queue
        n = self.numbers
        return {
            "id": self.id, "role": self.role, "state": self.state,
            "frames": n.get("frames", 0), "received": q.received if q else 0, "dropped": q.dropped if q else 0,
            "queued": q.frames if q else 0, "lag_s": q.lag() if q else 0.0,
            "t_start": n.get("t_start"), "t_end": n.get("t_end"), "wall_start": n.get("wall_start"),
            "wall_end": n.get("wall_end"), "bytes": n.get("bytes", 0), "hot_bytes": n.get("hot_bytes", 0),
            "disk_bytes": n.get("disk_bytes", 0), "gaps": self.gaps[-100:],
            "source": self.source.label if self.source else None, "owner": self.owner,
            "error": self.error or (self.source.error if self.source else None),
        }
