"""Frame sources: where frames come from, read in chunks at a sampling rate.

* ``video``: a video file, decoded with decord;
* ``images``: a folder of image files (sorted by name), one frame each;
* ``iterator``: any Python iterable of frames (``[H, W, 3]``) or batches;
* ``stream``: a camera or network stream (RTSP, HTTP, a V4L2 device, or any
  URL or file FFmpeg opens) through PyAV, sampled on its presentation times.

Every source yields ``(frames uint8 [n, H, W, 3], times [n] float64 seconds)``
and is built as ``cls(location, fps=..., **options)``.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

import mukv
from mukv.errors import InputError, expect_number
from mukv.frames import check_fps, read_video
from mukv.interfaces import FrameSource

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _check_fps(fps: float) -> float:
    return check_fps(fps)


def _count(value: Any, name: str, lo: int = 1, hi: int = 1 << 16) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InputError(f"{name} must be an integer from {lo} to {hi}; got {value!r}")
    return value


def _seconds(value: Any, name: str, lo: float = 0.001, hi: float = 86400.0) -> float:
    return expect_number(value, name, lo, hi, unit=" of seconds")


class VideoFileSource(FrameSource):
    """A video file read with decord, sampled at ``fps``.

    Args:
        location: path of the file.
        fps: frames per second to sample (at most the video's own rate unless ``upsample``).
        chunk: frames per chunk.
        upsample: allow ``fps`` above the video's rate (frames repeat).
        start: sampled frames to skip (an interrupted ingest resumes there).
    """

    def __init__(self, location: str | Path, fps: float = 0.5, chunk: int = 64, upsample: bool = False,
                 start: int = 0):
        if not isinstance(location, (str, Path)):
            raise InputError(f"the video source needs a file path; got {type(location).__name__}")
        self.location, self.fps, self.chunk = Path(location), _check_fps(fps), _count(chunk, "chunk")
        self.total, self._chunks = read_video(self.location, self.fps, self.chunk, upsample, start)  # validates now

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for frames, times in self._chunks:
            yield frames, times.to(torch.float64)


class ImageFolderSource(FrameSource):
    """Image files of a folder in name order, one frame each, ``1 / fps`` seconds apart.

    Args:
        location: the folder.
        fps: frames per second the images stand for.
        chunk: frames per chunk.
    """

    def __init__(self, location: str | Path, fps: float = 0.5, chunk: int = 64, start: int = 0):
        if not isinstance(location, (str, Path)):
            raise InputError(f"the images source needs a folder path; got {type(location).__name__}")
        self.location, self.fps, self.chunk = Path(location), _check_fps(fps), _count(chunk, "chunk")
        self.start = _count(start, "start", 0, 1 << 40)
        if not self.location.is_dir():
            raise InputError(f"not a folder of images: {self.location}")
        self.files = sorted(p for p in self.location.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise InputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {self.location}")
        self.total = len(self.files)

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from PIL import Image, UnidentifiedImageError

        for s in range(self.start, len(self.files), self.chunk):
            batch = []
            for p in self.files[s : s + self.chunk]:
                try:
                    with Image.open(p) as im:
                        batch.append(np.asarray(im.convert("RGB")))
                except (OSError, UnidentifiedImageError) as exc:
                    raise InputError(f"cannot read image {p}: {exc}") from None
            shapes = {b.shape for b in batch}
            if len(shapes) > 1:
                raise InputError(f"images in {self.location} have different sizes: {sorted(shapes)}")
            times = torch.arange(s, s + len(batch), dtype=torch.float64) / self.fps
            yield torch.from_numpy(np.stack(batch)), times


class IteratorSource(FrameSource):
    """Frames from a Python iterable of ``[H, W, 3]`` frames or ``[n, H, W, 3]`` batches,
    ``1 / fps`` seconds apart.

    Args:
        location: the iterable.
        fps: frames per second the frames stand for.
        chunk: frames per chunk.
    """

    def __init__(self, location: Iterable[Any], fps: float = 0.5, chunk: int = 64):
        if isinstance(location, (str, bytes, Path)) or not isinstance(location, Iterable):
            raise InputError(f"the iterator source needs an iterable of frames; got {type(location).__name__}")
        self.location, self.fps, self.chunk = location, _check_fps(fps), _count(chunk, "chunk")

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from mukv.frames import iter_chunks

        n = 0
        for frames in iter_chunks(self.location, self.chunk):
            times = torch.arange(n, n + frames.shape[0], dtype=torch.float64) / self.fps
            n += frames.shape[0]
            yield frames, times


class StreamSource(FrameSource):
    """A camera or network stream through PyAV (FFmpeg), sampled at ``fps`` on the
    stream's presentation times.

    Args:
        location: a URL (``rtsp://``, ``http://``, ``udp://`` ...), a device
            (``/dev/video0`` with ``format="v4l2"``), or a file path.
        fps: frames per second to keep.
        chunk: frames per chunk (a live source yields smaller chunks rather
            than wait: see ``max_wait_s``).
        format: FFmpeg input format (e.g. "v4l2", "avfoundation"), if needed.
        options: FFmpeg options (e.g. ``{"rtsp_transport": "tcp"}``).
        timeout_s: give up opening or reading after this many seconds.
        max_wait_s: yield what has been collected after this long.
        max_frames: stop after this many frames (``None``: until the stream ends).
    """

    def __init__(self, location: str | Path, fps: float = 0.5, chunk: int = 16, format: str | None = None,
                 options: dict[str, str] | None = None, timeout_s: float = 10.0, max_wait_s: float = 2.0,
                 max_frames: int | None = None, upsample: bool = False):
        try:
            import av  # noqa: F401
        except ImportError:  # pragma: no cover - av is installed with the video extra
            raise InputError("camera and network streams need PyAV: pip install 'mukv[video]'") from None
        if not isinstance(location, (str, Path)) or not str(location) or len(str(location)) > 8192 \
                or "\x00" in str(location):
            raise InputError(f"the stream source needs a URL, device or file path; got {location!r}"[:300])
        if format is not None and (not isinstance(format, str) or not format.isidentifier()):
            raise InputError(f"format must be an FFmpeg input format name (e.g. 'v4l2'); got {format!r}")
        if options is not None and (not isinstance(options, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in options.items())):
            raise InputError("options must be a dict of FFmpeg option names to string values")
        if max_frames is not None:
            _count(max_frames, "max_frames", 1, 1 << 40)
        self.location, self.fps, self.chunk = str(location), _check_fps(fps), _count(chunk, "chunk")
        self.format, self.options = format, dict(options or {})
        self.timeout_s, self.max_wait_s = _seconds(timeout_s, "timeout_s"), _seconds(max_wait_s, "max_wait_s")
        self.max_frames = max_frames
        self._container = self._open()
        try:
            vstreams = [s for s in self._container.streams if s.type == "video"]
            rate = float(vstreams[0].average_rate) if vstreams and vstreams[0].average_rate else None
            check_fps(self.fps, rate, upsample)
        except BaseException:
            self._container.close()
            raise

    def _open(self):
        """Open the stream on a helper thread, so that a source that never answers (a FIFO without a
        writer, a silent device) is an error after ``timeout_s`` instead of a hang."""
        import av

        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = av.open(self.location, format=self.format, options=self.options, timeout=self.timeout_s)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc

        th = threading.Thread(target=run, name="mukv-open-stream", daemon=True)
        th.start()
        th.join(self.timeout_s)
        if th.is_alive():
            raise InputError(f"cannot open stream {self.location!r}: no answer within {self.timeout_s:g} s (timeout_s)")
        exc = box.get("error")
        if exc is not None:
            if isinstance(exc, (av.FFmpegError, OSError)):
                raise InputError(f"cannot open stream {self.location!r}: {exc}") from None
            raise exc
        return box["value"]

    def _frames(self, container, vstream, out: "queue.Queue", stop: threading.Event) -> None:
        """Decoder thread: puts ``(time, frame)`` items, then ``None`` at the end, or an exception;
        closes the container when it ends or the reader asks it to stop."""
        import av

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for frame in container.decode(vstream):
                t = frame.time if frame.time is not None else time.monotonic()
                if not put((t, frame)):
                    return
            put(None)
        except av.FFmpegError as exc:
            put(InputError(f"stream {self.location!r} failed: {exc}"))
        except BaseException as exc:  # noqa: BLE001 - handed to the reader
            put(exc)
        finally:
            container.close()

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        container = self._container
        vstreams = [s for s in container.streams if s.type == "video"]
        if not vstreams:
            container.close()
            raise InputError(f"{self.location!r} has no video stream")
        q: queue.Queue = queue.Queue(maxsize=max(4, self.chunk * 2))
        stop = threading.Event()
        th = threading.Thread(target=self._frames, args=(container, vstreams[0], q, stop), name="mukv-decode",
                              daemon=True)
        th.start()
        step = 1.0 / self.fps
        next_t: float | None = None
        t0: float | None = None
        frames: list[np.ndarray] = []
        times: list[float] = []
        kept = 0
        last_yield = time.monotonic()
        try:
            while True:
                try:
                    item = q.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise InputError(f"stream {self.location!r}: no frame for {self.timeout_s:g} s (timeout_s)") from None
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                t, frame = item
                if t0 is None:
                    t0 = t
                t -= t0
                if next_t is None or t + 1e-9 >= next_t:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    times.append(t)
                    kept += 1
                    next_t = (math.floor(t / step + 1e-9) + 1) * step
                full = len(frames) >= self.chunk
                waited = frames and time.monotonic() - last_yield >= self.max_wait_s
                if full or waited:
                    yield torch.from_numpy(np.stack(frames)), torch.tensor(times, dtype=torch.float64)
                    frames, times = [], []
                    last_yield = time.monotonic()
                if self.max_frames is not None and kept >= self.max_frames:
                    break
            if frames:
                yield torch.from_numpy(np.stack(frames)), torch.tensor(times, dtype=torch.float64)
        finally:
            # the decoder closes the container; one blocked in a read of a silent source ends when it answers
            stop.set()


@mukv.hookimpl
def mukv_register_sources(register):
    register("video", VideoFileSource)
    register("images", ImageFolderSource)
    register("iterator", IteratorSource)
    register("stream", StreamSource)
