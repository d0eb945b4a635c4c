"""A feed's vision tower run ahead of its prefill.

A feed of more frames than one vision batch (``stream.encode_batch_frames``) is encoded and prefilled
piece by piece: the frames of one vision batch are encoded, then every block they complete is
prefilled, scored, compressed and stored, then the next piece. On a CUDA GPU the vision tower of the
next pieces runs on a side stream while the current piece is prefilled, so the two overlap on the
device: the vision tower's large matrix products fill the time in which the prefill's short kernels,
its memory-bound passes and the host's bookkeeping between them leave the GPU partly idle. The
pieces, their order and every kernel they run are the same with and without the overlap: only when
the kernels run changes, so the stored blocks are bit for bit those of the serial order.

Memory: at most :data:`AHEAD` pieces' visual tokens wait for their prefill, and each piece's vision
activations are freed before the piece after the next is encoded. A piece of frames in pageable host
memory (a feed over :data:`mukv.feeding.PIN_MAX_BYTES`, resized frames) is copied to pinned memory
first, so that its copy to the GPU does not hold the host.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

#: On a CUDA GPU, encode a feed's next pieces on a side stream while the current piece is prefilled.
#: Switched off only to measure what it saves (``benchmarks/accel_bench.py --ablate-encode-ahead``):
#: the pieces are then encoded on the current stream, each just before its prefill.
ENCODE_AHEAD = True

#: Pieces encoded ahead of the one being prefilled (at least 1).
AHEAD = 2

_SIDE: dict[int, "torch.cuda.Stream"] = {}


def side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream of a CUDA device on which feeds encode ahead (one per device, reused)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SIDE.get(index)
    if stream is None:
        stream = _SIDE[index] = torch.cuda.Stream(device=index)
    return stream


def pieces(n: int, size: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of ``n`` frames cut in pieces of ``size`` (the last one shorter)."""
    size = max(1, int(size))
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def encoded_pieces(encode: Callable[[torch.Tensor], torch.Tensor], frames: torch.Tensor, size: int,
                   device: torch.device) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, end, embeds [end - start, T, E])`` of each piece of ``frames`` (``[n, ...]``) in order.

    ``encode`` is the model's vision side for one piece (``frames[start:end] -> embeds``). On a CUDA
    ``device`` with :data:`ENCODE_AHEAD` and more than one piece, up to :data:`AHEAD` pieces are queued
    on :func:`side_stream` ahead of the one yielded, and the current stream waits for a piece's
    encoding before its tokens are used; otherwise each piece is encoded when it is taken.

    Close the iterator (``contextlib.closing``) when it is left early: the current stream then waits
    for the side stream's queued work, so no memory the side stream still writes is handed out again.
    """
    bounds = pieces(int(frames.shape[0]), size)
    if not (ENCODE_AHEAD and device.type == "cuda" and len(bounds) > 1 and torch.cuda.is_available()):
        for a, b in bounds:
            yield a, b, encode(frames[a:b])
        return
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
