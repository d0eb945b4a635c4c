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
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

import mukv
from mukv.errors import InputError
from mukv.frames import read_video
from mukv.interfaces import FrameSource

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _check_fps(fps: float) -> float:
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not math.isfinite(fps) or fps <= 0:
        raise InputError(f"fps must be a positive number; got {fps!r}")
    return float(fps)


class VideoFileSource(FrameSource):
    """A video file read with decord, sampled at ``fps``.

    Args:
        location: path of the file.
        fps: frames per second to sample.
        chunk: frames per chunk.
    """

    def __init__(self, location: str | Path, fps: float = 0.5, chunk: int = 64):
        self.location, self.fps, self.chunk = Path(location), _check_fps(fps), int(chunk)
        self.total, self._chunks = read_video(self.location, self.fps, self.chunk)  # validates now

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

    def __init__(self, location: str | Path, fps: float = 0.5, chunk: int = 64):
        self.location, self.fps, self.chunk = Path(location), _check_fps(fps), int(chunk)
        if not self.location.is_dir():
            raise InputError(f"not a folder of images: {self.location}")
        self.files = sorted(p for p in self.location.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise InputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {self.location}")

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from PIL import Image, UnidentifiedImageError

        for s in range(0, len(self.files), self.chunk):
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
        self.location, self.fps, self.chunk = location, _check_fps(fps), int(chunk)

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
                 max_frames: int | None = None):
        try:
            import av  # noqa: F401
        except ImportError:  # pragma: no cover - av is installed with the video extra
            raise InputError("camera and network streams need PyAV: pip install 'mukv[video]'") from None
        self.location, self.fps, self.chunk = str(location), _check_fps(fps), int(chunk)
        self.format, self.options = format, dict(options or {})
        self.timeout_s, self.max_wait_s, self.max_frames = float(timeout_s), float(max_wait_s), max_frames
        self._container = self._open()

    def _open(self):
        import av

        try:
            return av.open(self.location, format=self.format, options=self.options, timeout=self.timeout_s)
        except (av.FFmpegError, OSError) as exc:
            raise InputError(f"cannot open stream {self.location!r}: {exc}") from None

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import av

        container = self._container
        try:
            vstreams = [s for s in container.streams if s.type == "video"]
            if not vstreams:
                raise InputError(f"{self.location!r} has no video stream")
            step = 1.0 / self.fps
            next_t: float | None = None
            t0: float | None = None
            frames: list[np.ndarray] = []
            times: list[float] = []
            kept = 0
            last_yield = time.monotonic()
            try:
                for frame in container.decode(vstreams[0]):
                    t = frame.time if frame.time is not None else time.monotonic()
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
            except av.FFmpegError as exc:
                raise InputError(f"stream {self.location!r} failed: {exc}") from None
            if frames:
                yield torch.from_numpy(np.stack(frames)), torch.tensor(times, dtype=torch.float64)
        finally:
            container.close()


@mukv.hookimpl
def mukv_register_sources(register):
    register("video", VideoFileSource)
    register("images", ImageFolderSource)
    register("iterator", IteratorSource)
    register("stream", StreamSource)
