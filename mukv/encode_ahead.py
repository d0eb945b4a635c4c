"""A feed's vision tower run ahead of its prefill (on a CUDA GPU, by default: :data:`ENCODE_AHEAD`).

Off a GPU (or with :data:`ENCODE_AHEAD` off) a feed encodes all its frames (in vision batches of
``stream.encode_batch_frames``), then prefills, scores, compresses and stores every block they
complete: the serial order. With :data:`ENCODE_AHEAD` on (the default) and the model on a CUDA GPU,
a feed of more than one vision batch is encoded and prefilled piece by piece instead (one piece per
vision batch, all in the feed's one transaction), and the vision tower of the next pieces runs on a
side CUDA stream while the current piece is prefilled. The two then overlap on the device: the vision
tower's large matrix products can fill the time in which the prefill's short kernels, its
memory-bound passes and the host's bookkeeping between them leave the GPU partly idle. With and
without the side stream the pieces, their order and every kernel they run are the same, so what is
stored is bit for bit what the same pieces store run one after another on one stream; against the
serial order only the prefill's batches are cut differently (at piece ends), which moves results by
floating-point rounding.

Measured on an H100 (0.5B architecture, random weights, 256-frame feeds in vision batches of 64,
``benchmarks/accel_bench.py --compare-encode-ahead``, 2026-12-07): +0.9% to +1.9% frames/s over the
serial order in each of six modes, plain and accelerated, three runs each. So it is on by default;
``ENCODE_AHEAD = False`` restores the serial order. Off a GPU it changes nothing.

Memory: at most :data:`AHEAD` pieces' visual tokens wait for their prefill, and each piece's vision
activations are freed before the piece after the next is encoded. A piece of frames in pageable host
memory (a feed over :data:`mukv.feeding.PIN_MAX_BYTES`, resized frames) is copied to pinned memory
first, so that its copy to the GPU does not hold the host until the side stream's earlier work is done.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from .errors import InputError
from .loading import check_device

#: On a CUDA GPU, encode and prefill a feed of several vision batches piece by piece, the next pieces'
#: vision tower on a side stream beside the current piece's prefill (measured +1-2% frames/s on an H100).
ENCODE_AHEAD = True

#: Pieces encoded ahead of the one being prefilled (at least 1).
AHEAD = 2

_SIDE: dict[int, "torch.cuda.Stream"] = {}


def _count(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{name} must be a whole number of at least {low}; got {value!r}"[:200])
    return int(value)


def side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream of a CUDA device on which feeds encode ahead (one per device, reused)."""
    device = check_device(device)
    if device.type != "cuda":
        raise InputError(f"a side stream needs a CUDA device; got {device}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SIDE.get(index)
    if stream is None:
        stream = _SIDE[index] = torch.cuda.Stream(device=index)
    return stream


def pieces(n: int, size: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of ``n`` frames cut in pieces of ``size`` (the last one shorter)."""
    n, size = _count(n, "n", 0), _count(size, "size", 1)
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def ahead(device: torch.device) -> bool:
    """Whether feeds on ``device`` are encoded ahead (:data:`ENCODE_AHEAD` and a CUDA device)."""
    device = check_device(device)
    return bool(ENCODE_AHEAD) and device.type == "cuda" and torch.cuda.is_available()


def encoded_pieces(encode: Callable[[torch.Tensor], torch.Tensor], frames: torch.Tensor, size: int,
                   device: torch.device) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, end, embeds [end - start, T, E])`` of the pieces a feed of ``frames`` (``[n, ...]``) is
    prefilled in, in order.

    ``encode`` is the model's vision side for one vision batch of at most ``size`` frames. Unless
    :func:`ahead` holds for ``device`` (or there is only one vision batch), that is one piece: every
    vision batch encoded, then concatenated. Otherwise each vision batch is a piece, up to
    :data:`AHEAD` pieces are queued on :func:`side_stream` ahead of the one yielded, and the current
    stream waits for a piece's encoding before its tokens are used.

    Close the iterator (``contextlib.closing``) when it is left early: the current stream then waits
    for the side stream's queued work.
    """
    if not callable(encode):
        raise InputError(f"encode must be a callable frames -> embeds; got {type(encode).__name__}")
    if not isinstance(frames, torch.Tensor) or frames.dim() < 1:
        raise InputError(f"frames must be a tensor [n, ...]; got {type(frames).__name__}")
    device = check_device(device)
    return _pieces(encode, frames, pieces(int(frames.shape[0]), size), device)


def _pieces(encode: Callable[[torch.Tensor], torch.Tensor], frames: torch.Tensor, bounds: list[tuple[int, int]],
            device: torch.device) -> Iterator[tuple[int, int, torch.Tensor]]:
    if not bounds:  # no frames: no piece
        return
    if len(bounds) == 1 or not ahead(device):  # one piece of every vision batch
        parts = [encode(frames[a:b]) for a, b in bounds]
        yield 0, int(frames.shape[0]), parts[0] if len(parts) == 1 else torch.cat(parts)
    elif device.type == "cuda":
        yield from _on_side_stream(encode, frames, bounds, device)
    else:  # the piece order on one stream (where ahead() holds off a GPU: the CPU tests force it)
        for a, b in bounds:
            yield a, b, encode(frames[a:b])


def _on_side_stream(encode: Callable[[torch.Tensor], torch.Tensor], frames: torch.Tensor,
                    bounds: list[tuple[int, int]], device: torch.device) -> Iterator[tuple[int, int, torch.Tensor]]:
    main = torch.cuda.current_stream(device)
    side = side_stream(device)
    side.wait_stream(main)  # inputs the current stream made (the usual input is host memory)
    queued: list[tuple[int, int, torch.Tensor, torch.cuda.Event]] = []
    todo = iter(bounds)
    try:
        while True:
            with torch.cuda.stream(side):
                for a, b in todo:
                    embeds = encode(_staged(frames[a:b]))
                    done = torch.cuda.Event()
                    done.record(side)
                    queued.append((a, b, embeds, done))
                    if len(queued) > AHEAD:
                        break
            if not queued:
                return
            a, b, embeds, done = queued.pop(0)
            main.wait_event(done)
            embeds.record_stream(main)  # its memory is not reused by the side stream before the prefill ran
            yield a, b, embeds
    finally:
        queued.clear()
        main.wait_stream(side)


def _staged(part: torch.Tensor) -> torch.Tensor:
    """A host piece in pinned memory (a copy where it is pageable; see :data:`mukv.feeding.PIN_FRAMES`):
    a copy from pageable memory would first wait for every kernel queued on the side stream, and so hold
    the host until the pieces before it are encoded, instead of letting it go on to the prefill."""
    if part.device.type != "cpu" or part.is_pinned():
        return part
    from .feeding import private_copy

    return private_copy(part, pin=True)
