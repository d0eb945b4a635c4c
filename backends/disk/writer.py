"""The offload writer: a background thread that makes added blocks durable.

``feed`` hands each batch to :meth:`OffloadWriter.submit` and returns; the
thread groups whatever has queued up (up to ``commit_interval`` seconds of it,
or at once when someone waits) and passes the group to the backend's commit
function, which writes KV first, then index rows, then the stream state. The
queue is bounded in bytes: when disk cannot keep up, ``submit`` waits
(back-pressure) instead of letting memory grow.

A failed commit stops the writer: everything still queued is dropped, and
the error is raised by every later ``submit``/``flush``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable


class OffloadWriter:
    """Runs ``commit(items)`` on a thread for queued items, in order.

    Args:
        commit: called with a list of items (in submission order); raises on failure.
        max_pending_bytes: bytes that may wait in the queue before ``submit`` blocks.
        commit_interval: seconds a first queued item may wait for others to join its group.
        on_idle: called on the thread after each group (index upkeep); its errors are kept
            like commit errors.
        name: thread name.
    """

    def __init__(self, commit: Callable[[list[Any]], None], max_pending_bytes: int = 256 << 20,
                 commit_interval: float = 2.0, on_idle: Callable[[], None] | None = None,
                 name: str = "mukv-offload"):
        self._commit = commit
        self._on_idle = on_idle
        self.max_pending_bytes = max_pending_bytes
        self.commit_interval = commit_interval
        self._queue: deque[tuple[int, Any, int]] = deque()
        self._cv = threading.Condition()
        self._pending_bytes = 0
        self._submitted = 0  # sequence number of the last submitted item
        self._done = 0  # sequence number of the last committed item
        self._urgent = 0  # sequence up to which someone waits
        self._stop = False
        self.error: BaseException | None = None
        self.groups = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- caller side --------------------------------------------------------------------
    def submit(self, item: Any, nbytes: int = 0) -> int:
        """Queue ``item``; wait while the queue holds more than ``max_pending_bytes``. Returns its sequence number."""
        with self._cv:
            self._raise()
            while self._pending_bytes > 0 and self._pending_bytes + nbytes > self.max_pending_bytes:
                self._urgent = max(self._urgent, self._submitted)
                self._cv.notify_all()
                self._cv.wait(0.5)
                self._raise()
            self._submitted += 1
            self._queue.append((self._submitted, item, nbytes))
            self._pending_bytes += nbytes
            self._cv.notify_all()
            return self._submitted

    def wait(self, seq: int | None = None, timeout: float | None = None) -> bool:
        """Commit everything up to ``seq`` (default: all submitted) now and wait for it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            seq = self._submitted if seq is None else seq
            self._urgent = max(self._urgent, seq)
            self._cv.notify_all()
            while self._done < seq:
                self._raise()
                if self._stop and not self._thread.is_alive():
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(0.5 if left is None else min(0.5, left))
            self._raise()
            return self._done >= seq

    def hurry(self) -> None:
        """Ask for a commit of everything queued, without waiting."""
        with self._cv:
            self._urgent = max(self._urgent, self._submitted)
            self._cv.notify_all()

    @property
    def pending(self) -> int:
        with self._cv:
            return self._submitted - self._done

    def close(self) -> None:
        """Commit what is queued (unless failed) and stop the thread."""
        with self._cv:
            self._stop = True
            self._urgent = self._submitted
            self._cv.notify_all()
        self._thread.join()

    def _raise(self) -> None:
        if self.error is not None:
            from mukv.errors import StoreError

            if isinstance(self.error, StoreError):
                raise StoreError(str(self.error))
            raise StoreError(f"background write failed: {type(self.error).__name__}: {self.error}")

    # -- thread side --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if not self._queue and self._stop:
                    return
                first = time.monotonic()
                while (not self._stop and self._urgent < self._queue[0][0]
                       and self._pending_bytes < self.max_pending_bytes // 2
                       and time.monotonic() - first < self.commit_interval):
                    self._cv.wait(max(0.0, self.commit_interval - (time.monotonic() - first)))
                group = list(self._queue)
                self._queue.clear()
            try:
                self._commit([item for _, item, _ in group])
                if self._on_idle is not None:
                    self._on_idle()
            except BaseException as exc:  # noqa: BLE001 - kept and raised to the caller
                with self._cv:
                    self.error = exc
                    self._pending_bytes = 0
                    self._queue.clear()
                    self._done = self._submitted
                    self._cv.notify_all()
                return
            with self._cv:
                self.groups += 1
                self._pending_bytes -= sum(n for _, _, n in group)
                self._done = group[-1][0]
                self._cv.notify_all()
