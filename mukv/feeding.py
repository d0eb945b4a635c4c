"""Feeding a :class:`~mukv.session.Session` (a part of it: :class:`SessionFeeding`, a mixin).

``Session.feed`` validates frames (of the stream's size, or resized to it) and their stream
times (given, wall-clock, or continuing the stream at ``config.stream.fps``), encodes them with
the model's vision tower and commits them in one transaction of the stream; ``Session.ingest``
and ``Session.feed_from`` feed a file or a registered frame source chunk by chunk
(:func:`mukv.ingest.feed_from`); ``Session.record_gap`` records frames that were dropped, and
``Session.thumbnail`` reads back a frame's thumbnail. :mod:`mukv.session` keeps those methods
(their signatures and documentation); the steps :mod:`mukv.ingest` and :mod:`mukv.batching`
take too (``_checked``, ``_stream_times``, ``_feed_batch``) live here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .clock import is_wall_clock, unix_array
from .errors import InputError, StoreError
from .frames import as_frames, as_timestamps, iter_chunks, resize_frames
from .loading import check_path
from .state import MAX_STREAM_TIME

#: A feed that encodes its frames at once (``Session.feed``, ``Session.ingest``) takes its private copy
#: of them in pinned host memory when the model runs on a CUDA GPU, so the vision tower's input
#: reaches the GPU by an asynchronous copy at full PCIe speed (a copy from pageable memory stages
#: through a driver buffer at about half of it and blocks the host until every kernel queued before
#: it has run). Switched off only to measure what it saves (``benchmarks/accel_bench.py
#: --ablate-pinned-frames``).
PIN_FRAMES = True

#: The largest feed (in bytes of frames) whose copy is pinned. PyTorch keeps freed pinned blocks for
#: reuse, rounded up to a power of two, so a feed of large frames (a chunk of 4K video) would leave
#: that much page-locked memory held for the life of the process; such feeds take the ordinary copy.
#: 256 MiB holds 256 frames of 384 x 384 (113 MB), the chunks the GPU benchmarks feed.
PIN_MAX_BYTES = 256 << 20


def private_copy(frames: torch.Tensor, pin: bool) -> torch.Tensor:
    """A copy of host ``frames`` that no caller can change: in pinned memory where ``pin`` (and
    :data:`PIN_FRAMES`, for at most :data:`PIN_MAX_BYTES`), else an ordinary clone (also where pinning
    fails: no pinned memory left)."""
    nbytes = frames.numel() * frames.element_size()
    if pin and PIN_FRAMES and frames.device.type == "cpu" and nbytes <= PIN_MAX_BYTES:
        try:
            out = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
        except RuntimeError:  # page-locked memory exhausted, or no CUDA driver: the plain copy
            return frames.clone()
        return out.copy_(frames)
    return frames.clone()


class SessionFeeding:
    """Feeding steps of :class:`~mukv.session.Session` (a mixin: it validates frames and their times,
    and stores them in the session's stream)."""

    def _feed(self, frames: Any, timestamps: Any, resize: bool | None) -> int:
        """``Session.feed``'s work."""
        with self._lock:
            self._check_writable()
            if isinstance(frames, (np.ndarray, torch.Tensor)):
                return self._feed_batch(self._checked(frames, resize, pin=self._pins_frames()), timestamps)
            if timestamps is not None:
                raise InputError("timestamps can only be given with an array of frames, not an iterable")
            if isinstance(frames, (str, bytes, Path)):
                raise InputError("feed() takes frames; use ingest() for a video file")
            if not isinstance(frames, Iterable):
                raise InputError(f"frames must be an array of uint8 [n, H, W, 3] or an iterable of frames; got {type(frames).__name__}")
            stored, pin = 0, self._pins_frames()
            for chunk in iter_chunks(frames, self.config.stream.encode_batch_frames):
                stored += self._feed_batch(self._checked(chunk, resize, pin=pin), None)
            return stored

    def _pins_frames(self) -> bool:
        """Frames this session encodes at once go to a CUDA GPU (see :data:`PIN_FRAMES`)."""
        device = getattr(self.model, "device", None)
        return isinstance(device, torch.device) and device.type == "cuda"

    def _checked(self, frames: Any, resize: bool | None, copy: bool = True,
                 want: tuple[int, int] | None = None, pin: bool = False) -> torch.Tensor:
        """Validated frames of the stream's size (or ``want``, the size of frames queued before these;
        resized if asked), as a private copy (in pinned memory where ``pin``: frames encoded at once
        on a GPU, see :data:`PIN_FRAMES`)."""
        if resize is not None and not isinstance(resize, (bool, np.bool_)):
            raise InputError(f"resize must be True, False or None (the session's setting); got {resize!r}"[:200])
        t = as_frames(frames)
        hw = (int(t.shape[1]), int(t.shape[2]))
        want = self._stream.frame_hw or want
        if want is not None and hw != want:
            if not (self.resize if resize is None else resize):
                raise InputError(
                    f"frame size changed: the stream's frames are {want[0]}x{want[1]}, these are {hw[0]}x{hw[1]}; "
                    "resize them (resize=True, or --resize on the command line), or start a new stream")
            return resize_frames(t, want)
        return private_copy(t, pin) if copy else t

    def _stream_times(self, timestamps: Any, n: int, after: "tuple[float | None, float | None, int] | None" = None
                      ) -> tuple[torch.Tensor, float | None]:
        """Validated stream times of ``n`` frames, and a wall-clock origin to set (a new stream given
        wall-clock timestamps), else ``None``. ``after``: ``(last time, wall-clock origin, frames)`` of
        the stream as frames queued but not fed yet leave it (default: as it is now)."""
        st = self._stream
        last, wall_origin, seen = (st.last_time, st.wall_origin, st.frames_seen) if after is None else after
        if timestamps is None:
            step = 1.0 / self.config.stream.fps
            base = -step if last is None else last
            ts = base + step * torch.arange(1, n + 1, dtype=torch.float64)
            if not (bool(torch.isfinite(ts).all()) and float(ts[0]) > base and bool((ts[1:] > ts[:-1]).all())
                    and float(ts[-1]) <= MAX_STREAM_TIME):
                raise InputError(f"stream time {base} is too large to continue at {self.config.stream.fps} fps; "
                                 "pass timestamps")
            return ts, None
        origin = None
        if is_wall_clock(timestamps):
            unix = unix_array(timestamps)
            if wall_origin is None:
                if seen > 0:
                    raise InputError("wall-clock timestamps given to a stream that counts stream seconds (it has no "
                                     "wall-clock origin): give stream seconds, or start a new stream")
                if unix.size and math.isfinite(float(unix[0])):
                    origin = float(unix[0])
            values = unix - (origin if origin is not None else wall_origin)
        else:
            values = timestamps
        ts = as_timestamps(values, n, last)
        if float(ts.abs().max()) > MAX_STREAM_TIME:
            raise InputError(f"timestamps must lie within +-{MAX_STREAM_TIME:g} stream seconds; got up to "
                             f"{float(ts.abs().max()):g}")
        return ts, origin

    def _feed_batch(self, frames: torch.Tensor, timestamps: Any, source: dict[str, Any] | None = None) -> int:
        self._check_writable()
        ts, origin = self._stream_times(timestamps, int(frames.shape[0]))
        st = self._stream
        with st.lock:  # in vision batches of encode_batch_frames (see mukv.encode_ahead)
            return st.feed(frames, ts, self.model.encode_frames, source, wall_origin=origin,
                           piece_frames=self.config.stream.encode_batch_frames)

    def _ingest(self, path: Any, fps: float | None, upsample: bool, force: bool, resize: bool | None,
                on_chunk: Any) -> int:
        """``Session.ingest``'s work."""
        if not isinstance(path, (str, Path)):
            raise InputError(f"ingest() takes the path of a video file; got {type(path).__name__}")
        return self.feed_from("video", check_path(path, "path"), fps=fps, upsample=upsample, force=force,
                              resize=resize, on_chunk=on_chunk)

    def _record_gap(self, t_start: float, t_end: float, frames: int, reason: str) -> None:
        """``Session.record_gap``'s work."""
        with self._lock:
            self._check_writable()
            self._stream.record_gap(t_start, t_end, frames, reason)

    def _thumbnail(self, frame: Any) -> bytes:
        """``Session.thumbnail``'s work."""
        if not isinstance(frame, (int, np.integer)) or isinstance(frame, bool):
            raise InputError(f"frame must be a frame index (int); got {type(frame).__name__}")
        with self._lock:
            self._check_open()
            self._refresh_reader()
            if not self._stream.thumbnails:
                raise StoreError(f"stream {self.stream_id!r} keeps no thumbnails (create it with thumbnails=96)")
            if not 0 <= int(frame) < self._stream.frames_seen:
                raise InputError(f"frame {int(frame)} is not stored: the stream has frames 0..{self._stream.frames_seen - 1}")
            data = self.backend.read_file(f"thumbs/{int(frame):09d}.jpg")
            if data is None:
                raise StoreError(f"stream {self.stream_id!r}: the thumbnail of frame {int(frame)} is missing")
            return data
