"""Validation and reading of frames: what ``Session.feed`` and ``Session.ingest`` accept."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from .errors import InputError


def as_frames(frames: Any, expect_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """Validate frames and return ``uint8 [n, H, W, 3]`` (a CPU tensor, no copy where possible).

    Accepts a numpy array or torch tensor of shape ``[n, H, W, 3]`` or a single
    ``[H, W, 3]`` frame, dtype uint8.

    Raises:
        InputError: wrong type, dtype, shape, an empty batch, or a frame size
            different from ``expect_hw``.
    """
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise InputError(f"frames must be uint8 RGB (0-255); got dtype {frames.dtype}")
        if any(s < 0 for s in frames.strides):  # torch takes no negative strides, even on size-1 axes
            frames = frames.copy()
        t = torch.from_numpy(np.ascontiguousarray(frames))
    elif isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8:
            raise InputError(f"frames must be uint8 RGB (0-255); got dtype {frames.dtype}")
        if frames.is_nested or frames.layout != torch.strided or frames.device.type == "meta":
            kind = "nested" if frames.is_nested else frames.device.type if frames.device.type == "meta" else frames.layout
            raise InputError(f"frames must be a dense tensor holding pixel data; got a {kind} tensor")
        t = frames.detach().cpu()
    else:
        raise InputError(f"frames must be a numpy array or torch tensor of uint8 [n, H, W, 3]; got {type(frames).__name__}")
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[-1] != 3:
        raise InputError(f"frames must have shape [n, H, W, 3] (RGB, channels last); got {tuple(frames.shape)}")
    if t.shape[0] == 0:
        raise InputError("no frames given (an empty batch)")
    if t.shape[1] < 2 or t.shape[2] < 2:
        raise InputError(f"frames are too small: {t.shape[1]}x{t.shape[2]} pixels")
    hw = (int(t.shape[1]), int(t.shape[2]))
    if expect_hw is not None and hw != expect_hw:
        raise InputError(
            f"frame size changed: the stream's frames are {expect_hw[0]}x{expect_hw[1]}, these are {hw[0]}x{hw[1]}; "
            "resize them, or start a new stream"
        )
    return t


def as_timestamps(timestamps: Any, n: int, after: float | None) -> torch.Tensor | None:
    """Validate ``n`` timestamps (seconds): finite, strictly increasing, after ``after``."""
    if timestamps is None:
        return None
    try:
        arr = np.asarray(timestamps)
        if arr.dtype == np.bool_ or arr.dtype.kind == "c":
            raise InputError(f"timestamps must be real numbers (seconds), not {'booleans' if arr.dtype == np.bool_ else 'complex'}")
        if arr.ndim > 1:
            raise InputError(f"timestamps must be one number per frame, shape [{n}]; got shape {list(arr.shape)}")
        ts = torch.as_tensor(arr.astype(np.float64)).reshape(-1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InputError(f"timestamps must be numbers (seconds): {exc}") from None
    if ts.numel() != n:
        raise InputError(f"got {ts.numel()} timestamps for {n} frames")
    if not torch.isfinite(ts).all():
        raise InputError("timestamps must be finite numbers (seconds)")
    if n > 1 and not bool((ts[1:] > ts[:-1]).all()):
        raise InputError("timestamps must be strictly increasing")
    if after is not None and float(ts[0]) <= after:
        raise InputError(f"timestamps must continue the stream: first {float(ts[0])} <= last fed {after}")
    return ts


def resize_frames(frames: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Frames ``uint8 [n, H, W, 3]`` resized to ``hw`` (bilinear, antialiased), as a new tensor."""
    x = frames.permute(0, 3, 1, 2).float()
    y = torch.nn.functional.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def iter_chunks(frames: Iterable[Any], size: int) -> Iterator[torch.Tensor]:
    """Group an iterable of single frames (``[H, W, 3]``) or batches into batches of ``size``.

    Every item is copied as it arrives: a live source may fill one preallocated buffer and
    yield it again and again."""
    buf: list[torch.Tensor] = []
    count = 0
    for item in frames:
        t = as_frames(item, tuple(buf[0].shape[1:3]) if buf else None).clone()  # one chunk, one frame size
        buf.append(t)
        count += t.shape[0]
        if count >= size:
            yield torch.cat(buf)
            buf, count = [], 0
    if buf:
        yield torch.cat(buf)


#: slowest sampling accepted (one frame in about 11.6 days): stream times stay bounded
MIN_FPS = 1e-6
#: fastest sampling accepted, upsampled or not
MAX_FPS = 1000.0


def check_fps(fps: Any, native: float | None = None, upsample: bool = False, what: str = "fps") -> float:
    """A sampling rate: a finite number in [:data:`MIN_FPS`, :data:`MAX_FPS`], at most the source's own
    rate ``native`` unless ``upsample``."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(fps)) or fps <= 0:
        raise InputError(f"{what} must be a positive finite number; got {fps!r}")
    fps = float(fps)
    if not MIN_FPS <= fps <= MAX_FPS:
        raise InputError(f"{what} must be between {MIN_FPS:g} and {MAX_FPS:g} frames per second; got {fps:g}")
    if not isinstance(upsample, bool):
        raise InputError(f"upsample must be True or False; got {upsample!r}")
    if native is not None and native > 0 and fps > native * (1 + 1e-6) and not upsample:
        raise InputError(f"{what} {fps:g} is above the source's own rate ({native:g} frames per second); sample at "
                         "most that, or pass upsample=True (--upsample) to repeat frames")
    return fps


def read_video(path: str | Path, fps: float, chunk: int = 64, upsample: bool = False, start: int = 0
               ) -> tuple[int, Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """Sample a video file at ``fps`` (decord; PyAV for files decord misreads).

    Args:
        fps: sampling rate, at most the video's own unless ``upsample``.
        chunk: frames per chunk.
        start: sampled frames to skip (an interrupted ingest resumes there).

    Returns:
        ``(n, chunks)``: the number of sampled frames (skipped ones included) and an iterator of
        ``(frames uint8 [c, H, W, 3], times [c] seconds from the video's start)``.

    Raises:
        InputError: missing, unreadable or empty file, or a bad ``fps``.
    """
    p = Path(path)
    check_fps(fps)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= 1 << 16:
        raise InputError(f"chunk must be a number of frames from 1 to 65536; got {chunk!r}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise InputError(f"start must be a non-negative number of frames; got {start!r}")
    if not p.exists():
        raise InputError(f"video file not found: {p}")
    if not p.is_file():
        raise InputError(f"not a file (a folder or a special file): {p}")
    reader = _open_video(p)
    total, native = reader.total, reader.fps
    if total == 0 or not math.isfinite(native) or native <= 0:
        raise InputError(f"video {p} has no frames")
    fps = check_fps(fps, native, upsample)
    duration = total / native
    n = int(math.ceil(duration * fps - 1e-9))  # times 0, 1/fps, ... below the duration

    def gen() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for s in range(start, n, chunk):
            times = np.arange(s, min(n, s + chunk), dtype=np.float64) / fps
            idx = np.minimum(np.round(times * native).astype(np.int64), total - 1)
            yield torch.from_numpy(reader.frames(idx)), torch.from_numpy(times)

    return n, gen()


def video_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of a video file's frames, without decoding the whole file.

    Raises:
        InputError: missing, unreadable or empty file.
    """
    reader = _open_video(Path(path))
    if not reader.total:
        raise InputError(f"video {path} has no frames")
    return reader.size


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class _Decord:
    """Random access through decord (fast); ``ok`` is False where decord misreads the file.

    decord 0.6 decodes frames whose width it pads (e.g. 48 px wide) into a buffer of another
    size: ``get_batch`` fails and ``vr[i]`` returns 4 channels. Such files go to :class:`_PyAV`.
    """

    def __init__(self, p: Path):
        import decord

        self.path = p
        self.vr = decord.VideoReader(str(p), ctx=decord.cpu(0))
        self.total, self.fps = len(self.vr), float(self.vr.get_avg_fps())
        self.ok, self.size = True, (0, 0)
        if self.total:
            try:
                first = self.vr.get_batch([0]).asnumpy()
                self.ok = first.ndim == 4 and first.shape[-1] == 3
                self.size = (int(first.shape[1]), int(first.shape[2]))
            except Exception:  # noqa: BLE001 - decord raises its own types
                self.ok = False

    def frames(self, idx: np.ndarray) -> np.ndarray:
        try:
            return self.vr.get_batch(idx.tolist()).asnumpy()
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"cannot decode {self.path} near frame {int(idx[0])}: {_first_line(exc)}") from None


class _PyAV:
    """Sequential decoding through PyAV, for files decord misreads; frames are picked by index."""

    def __init__(self, p: Path):
        import av

        self.path, self._av = p, av
        with av.open(str(p)) as c:
            if not c.streams.video:
                raise InputError(f"video {p} has no video stream")
            vs = c.streams.video[0]
            rate = vs.average_rate or vs.guessed_rate
            self.fps = float(rate) if rate else float("nan")
            self.size = (int(vs.codec_context.height), int(vs.codec_context.width))
            self.total = int(vs.frames) or sum(1 for pk in c.demux(vs) if pk.size)
        self._next, self._iter, self._container, self._last = 0, None, None, None

    def frames(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self.size, 3), dtype=np.uint8)
        want = idx.tolist()
        if self._iter is None or want[0] < self._next - 1:  # restart for a backwards jump
            self._restart()
        j, last = 0, None
        try:
            while j < len(want):
                while self._next <= want[j]:
                    last = next(self._iter)
                    self._next += 1
                    self._last = last
                rgb = self._last.to_ndarray(format="rgb24")
                if rgb.shape[:2] != self.size:
                    raise InputError(f"video {self.path} changes frame size mid-file ({rgb.shape[1]}x{rgb.shape[0]})")
                while j < len(want) and want[j] == self._next - 1:
                    out[j] = rgb
                    j += 1
        except StopIteration:
            raise InputError(f"cannot decode {self.path} near frame {want[j]}: the file ends early") from None
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - av raises its own error types
            raise InputError(f"cannot decode {self.path} near frame {want[j]}: {_first_line(exc)}") from None
        return out

    def _restart(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = self._av.open(str(self.path))
        self._iter = self._container.decode(self._container.streams.video[0])
        self._next = 0

    def __del__(self) -> None:
        if getattr(self, "_container", None) is not None:
            self._container.close()


def _open_video(p: Path) -> "_Decord | _PyAV":
    """A reader of the video file ``p`` (decord, or PyAV where decord misreads the file)."""
    if not p.exists():
        raise InputError(f"video file not found: {p}")
    if not p.is_file():
        raise InputError(f"not a file (a folder or a special file): {p}")
    try:
        reader = _Decord(p)
        if reader.ok:
            return reader
    except ImportError:  # pragma: no cover - decord is a dependency of the video extra
        pass
    except Exception as exc:  # noqa: BLE001 - decord raises its own DECORDError
        decord_error = exc
    else:
        decord_error = None
    try:
        return _PyAV(p)
    except ImportError:  # pragma: no cover
        raise InputError("reading video files needs decord and PyAV: pip install 'mukv[video]'") from None
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read video {p}: {_first_line(decord_error or exc)}") from None
