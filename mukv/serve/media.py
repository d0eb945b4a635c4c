"""Frames from request bodies: JPEG/PNG images and ``.npy`` arrays, checked before they are decoded.

Every limit is checked on what a header says before any pixel is decoded or any array
allocated: an image's size in its header, an ``.npy``'s dtype and shape in its header, and
the bytes that follow must match. Anything wrong is an :class:`~mukv.errors.InputError`
(or :class:`~mukv.serve.errors.TooLarge`) naming it.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from typing import Any

import numpy as np

from ..errors import InputError
from .errors import TooLarge

IMAGE_FORMATS = ("JPEG", "PNG")
NPY_MAGIC = b"\x93NUMPY"


def decode_image(data: bytes, max_pixels: int, name: str = "image") -> np.ndarray:
    """``uint8 [H, W, 3]`` RGB pixels of a JPEG or PNG file."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.format not in IMAGE_FORMATS:
                raise InputError(f"{name}: a {im.format or 'unknown'} image; send JPEG or PNG (or an .npy array)")
            w, h = im.size
            if w * h > max_pixels:
                raise TooLarge(f"{name}: {w}x{h} pixels is more than max_frame_pixels ({max_pixels})")
            if w < 2 or h < 2:
                raise InputError(f"{name}: {w}x{h} pixels is too small")
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (InputError, TooLarge):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooLarge(f"{name}: the image claims more pixels than max_frame_pixels ({max_pixels})") from None
    except UnidentifiedImageError as exc:
        raise InputError(f"{name}: not a readable JPEG or PNG image ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:  # truncated or corrupt data
        raise InputError(f"{name}: damaged image ({' '.join(str(exc).split()) or type(exc).__name__})") from None
    if rgb.shape != (h, w, 3):
        raise InputError(f"{name}: decoded to shape {rgb.shape}, expected ({h}, {w}, 3)")
    return rgb


def decode_npy(data: bytes, max_pixels: int, max_frames: int, name: str = "array") -> np.ndarray:
    """``uint8 [n, H, W, 3]`` frames of an ``.npy`` file (one ``[H, W, 3]`` frame is taken too)."""
    if not data.startswith(NPY_MAGIC):
        raise InputError(f"{name}: not an .npy file (no NUMPY magic)")
    buf = io.BytesIO(data)
    try:
        major, minor = np.lib.format.read_magic(buf)
        if (major, minor) == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf, max_header_size=10000)
        elif (major, minor) in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf, max_header_size=10000)
        else:
            raise InputError(f"{name}: unsupported .npy version {major}.{minor}")
    except InputError:
        raise
    except (ValueError, SyntaxError, TypeError, EOFError) as exc:
        raise InputError(f"{name}: damaged .npy header ({' '.join(str(exc).split())})") from None
    if dtype != np.dtype(np.uint8):
        raise InputError(f"{name}: frames must be uint8 RGB (0-255); got dtype {dtype}")
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or shape[3] != 3:
        raise InputError(f"{name}: frames must have shape [n, H, W, 3] (RGB, channels last); got {tuple(shape)}")
    n, h, w, _ = (int(s) for s in shape)
    if n == 0:
        raise InputError(f"{name}: no frames (an empty batch)")
    if n > max_frames:
        raise TooLarge(f"{name}: {n} frames is more than max_frames_per_push ({max_frames})")
    if h * w > max_pixels:
        raise TooLarge(f"{name}: {h}x{w} pixels is more than max_frame_pixels ({max_pixels})")
    if h < 2 or w < 2:
        raise InputError(f"{name}: frames are too small: {h}x{w} pixels")
    need = n * h * w * 3
    body = memoryview(data)[buf.tell():]
    if len(body) != need:
        raise InputError(f"{name}: the header says {n}x{h}x{w}x3 = {need} bytes of pixels; the file holds {len(body)}")
    arr = np.frombuffer(body, dtype=np.uint8).reshape((n, h, w, 3), order="F" if fortran else "C")
    return np.array(arr, order="C")  # a writable copy, apart from the request's bytes


def stack(frames: list[np.ndarray], max_frames: int) -> np.ndarray:
    """One ``[n, H, W, 3]`` batch of frames of one size."""
    if not frames:
        raise InputError("no frames in the request: send image files or an .npy array in 'frame' parts")
    total = sum(f.shape[0] if f.ndim == 4 else 1 for f in frames)
    if total > max_frames:
        raise TooLarge(f"{total} frames in one push is more than max_frames_per_push ({max_frames})")
    sizes = sorted({tuple(f.shape[-3:-1]) for f in frames})
    if len(sizes) > 1:
        raise InputError(f"the frames of one push must have one size; got {sizes}")
    return np.concatenate([f if f.ndim == 4 else f[None] for f in frames])


def parse_timestamps(raw: Any) -> np.ndarray | None:
    """Timestamps from a form field or query parameter: a JSON array or comma-separated numbers."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if isinstance(raw, (list, tuple)):
        values = list(raw)
    else:
        text = str(raw).strip()
        if len(text) > 1_000_000:
            raise TooLarge("timestamps: more than 1 MB of text")
        try:
            values = json.loads(text) if text.startswith("[") else [v for v in text.split(",")]
        except json.JSONDecodeError as exc:
            raise InputError(f"timestamps: invalid JSON ({exc.msg})") from None
    if not isinstance(values, list):
        raise InputError("timestamps: expected a list of numbers (seconds)")
    out = []
    for v in values:
        if isinstance(v, bool) or v is None:
            raise InputError(f"timestamps must be numbers (seconds); got {v!r}")
        try:
            x = float(v.strip()) if isinstance(v, str) else float(v)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"timestamps must be numbers (seconds); got {v!r}") from None
        if not math.isfinite(x):
            raise InputError(f"timestamps must be finite numbers (seconds); got {v!r}")
        out.append(x)
    return np.asarray(out, dtype=np.float64)


def is_npy(data: bytes) -> bool:
    return data[:6] == NPY_MAGIC


def frames_from_parts(parts: list[tuple[str, bytes]], max_pixels: int, max_frames: int) -> np.ndarray:
    """Decode the ``(filename, bytes)`` parts of a push: images, or one or more ``.npy`` arrays."""
    frames = []
    for i, (fname, data) in enumerate(parts):
        label = f"part {i + 1}" + (f" ({fname})" if fname else "")
        if is_npy(data):
            frames.append(decode_npy(data, max_pixels, max_frames, label))
        else:
            frames.append(decode_image(data, max_pixels, label))
    return stack(frames, max_frames)

