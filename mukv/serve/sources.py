"""A stream's source: frames pulled from a file, a folder, or a camera/network URL.

The frames come through the registered frame sources (``mukv plugins --role sources``) and go
into the stream's queue like pushed frames. A live source (a camera, an RTSP/HTTP stream)
never waits: when ingest falls behind, its frames wait up to the server's ``max_lag_s`` and are
then dropped. A file or a folder is read as fast as ingest takes it, never dropping.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import InputError
from .queues import FrameQueue

_URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")


def open_source(kind: str | None, location: str, fps: float, chunk: int, options: dict[str, Any] | None = None):
    """Open a registered frame source (a file is checked, a URL connected, now).

    Returns:
        ``(kind, source)``.

    Raises:
        InputError: the source cannot be opened.
        UnknownPluginError: no such source.
    """
    from ..registry import registry

    kind = kind or guess_kind(location)
    cls = registry().get("sources", kind, field="source.kind")
    opts = dict(options or {})
    opts.setdefault("chunk", chunk)
    try:
        return kind, cls(location, fps=fps, **opts)
    except (TypeError, ValueError, OverflowError) as exc:  # an option the source does not take, or a bad value
        if isinstance(exc, InputError):
            raise
        raise InputError(f"source {kind!r}: bad options {sorted(opts)}: {exc}") from None


def guess_kind(location: str) -> str:
    """``stream`` for a URL or a device, ``images`` for a folder, else ``video``."""
    low = location.lower()
    if low.startswith(_URL_SCHEMES) or low.startswith("/dev/"):
        return "stream"
    if Path(location).is_dir():
        return "images"
    return "video"


class SourcePuller:
    """Reads one registered frame source on a daemon thread into a stream's queue.

    Args:
        queue: the stream's queue.
        source: an opened source (:func:`open_source`).
        kind: its registered name ("video", "images", "stream").
        location: what it reads.
        fps: its sampling rate.
        live: drop frames when ingest falls behind (else wait for room).
        on_frames: called with the number of frames queued (metrics).
        wake: called after each chunk (wakes the engine).
    """

    def __init__(self, queue: FrameQueue, source: Any, kind: str, location: str, fps: float, live: bool,
                 on_frames: Callable[[int], None] | None = None, wake: Callable[[], None] | None = None):
        self.queue, self.source, self.kind, self.location, self.fps, self.live = queue, source, kind, location, fps, live
        self.on_frames, self.wake = on_frames, wake
        self.state = "pulling"
        self.error: str | None = None
        self.frames = 0
        self._stop = threading.Event()
        self._offset: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"mukv-source-{location}", daemon=True)
        self._thread.start()

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.location}"

    def _run(self) -> None:
        try:
            for frames, times in self.source.chunks():
                if self._stop.is_set():
                    break
                f = frames.numpy() if hasattr(frames, "numpy") else np.asarray(frames)
                t = times.numpy().astype(np.float64) if hasattr(times, "numpy") else np.asarray(times, np.float64)
                if self._offset is None:  # source times start at 0: continue the stream after its last frame
                    last = self.queue.last_time
                    self._offset = 0.0 if last is None else last + 1.0 / self.fps
                if not self.live:
                    while not self.queue.wait_room(f.nbytes, timeout=0.5):
                        if self._stop.is_set() or self.queue.closed:
                            return
                self.queue.push(np.ascontiguousarray(f), t + self._offset)
                self.frames += int(f.shape[0])
                if self.on_frames is not None:
                    self.on_frames(int(f.shape[0]))
                if self.wake is not None:
                    self.wake()
            self.state = "source ended"
        except Exception as exc:  # noqa: BLE001 - reported in the stream's status
            if not self._stop.is_set():
                self.state = "source failed"
                self.error = " ".join(str(exc).split()) or type(exc).__name__
        finally:
            if self.state == "pulling":
                self.state = "source stopped"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the current chunk (a source blocked in a read ends at its own timeout)."""
        self._stop.set()
        self._thread.join(timeout)
