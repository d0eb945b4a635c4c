"""Byte movement between the device and the host, kept apart from bookkeeping.

On CUDA, KV leaves the GPU through reused pinned host buffers with
non-blocking copies on a side stream (the feeding stream never waits), and
comes back the same way: page-in reads from disk straight into a pinned
staging buffer (:meth:`Mover.staging`) and uploads it in one copy; each
buffer is reused only after the event of its last copy completed. On CPU
these are plain copies, and page-in reads straight into its output.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch


class PinnedPool:
    """Reusable pinned host buffers (page-locked memory is slow to allocate)."""

    def __init__(self, max_free: int = 8):
        self._free: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self._lock = threading.Lock()
        self.max_free = max_free

    def get(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            for i, (buf, ev) in enumerate(self._free):
                if buf.numel() >= nbytes:
                    del self._free[i]
                    if ev is not None:
                        ev.synchronize()
                    return buf
        return torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, pin_memory=True)

    def put(self, buf: torch.Tensor, event: "torch.cuda.Event | None" = None) -> None:
        with self._lock:
            self._free.append((buf, event))
            self._free.sort(key=lambda x: x[0].numel())
            while len(self._free) > self.max_free:
                self._free.pop(0)


class HostCopy:
    """A host copy of a device tensor that may still be in flight.

    Attributes:
        tensor: the host tensor (pinned on CUDA).
    """

    def __init__(self, tensor: torch.Tensor, event=None, buffer: torch.Tensor | None = None,
                 pool: PinnedPool | None = None):
        self.tensor = tensor
        self._event = event
        self._buffer = buffer
        self._pool = pool

    def wait(self) -> torch.Tensor:
        """Block until the copy landed; return the host tensor."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self.tensor

    def release(self) -> None:
        """Give a pinned buffer back to its pool."""
        if self._buffer is not None and self._pool is not None:
            self._pool.put(self._buffer)
        self._buffer = None


class Mover:
    """Copies between a session's device and host memory.

    Args:
        device: the session's device.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.pool = PinnedPool() if self.cuda else None
        self._stream = torch.cuda.Stream(device=self.device) if self.cuda else None

    def to_host(self, t: torch.Tensor, dtype: torch.dtype) -> HostCopy:
        """Start copying ``t`` to host memory (returns at once on CUDA)."""
        if self.cuda and t.is_cuda:
            t = t.to(dtype)
            buf = self.pool.get(t.numel() * t.element_size())
            host = buf[: t.numel() * t.element_size()].view(dtype).view(t.shape)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                host.copy_(t, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            t.record_stream(self._stream)
            return HostCopy(host, event, buf, self.pool)
        return HostCopy(t.detach().to("cpu", dtype).contiguous().clone())

    def staging(self, shape: tuple[int, ...], dtype: torch.dtype) -> HostCopy:
        """A host buffer of ``shape`` that page-in reads into before :meth:`upload`: a reused pinned
        buffer on CUDA, a plain tensor otherwise."""
        if not self.cuda:
            return HostCopy(torch.empty(shape, dtype=dtype))
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        buf = self.pool.get(nbytes)
        return HostCopy(buf[:nbytes].view(dtype).view(shape), None, buf, self.pool)

    def upload(self, host: HostCopy) -> torch.Tensor:
        """Copy a :meth:`staging` buffer to the device (non-blocking on CUDA); the pinned buffer goes
        back to the pool, reused only after this copy completed."""
        if not self.cuda:
            return host.tensor
        out = host.tensor.to(self.device, non_blocking=True)
        if host._buffer is not None and host._pool is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            host._pool.put(host._buffer, event)
            host._buffer = None
        return out

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """Copy a host tensor to the device (through a pinned buffer on CUDA)."""
        if not self.cuda:
            return host
        staged = self.staging(tuple(host.shape), host.dtype)
        staged.tensor.copy_(host)
        return self.upload(staged)


def as_numpy_rows(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's rows as numpy (bf16 as its uint16 bits)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


#: the M_MMAP_THRESHOLD set by :func:`pin_mmap_threshold` (None: glibc's own)
_mmap_threshold: int | None = None


def pin_mmap_threshold(nbytes: int) -> bool:
    """Make glibc serve allocations of at least ``nbytes`` with their own mmap, returned to the system on free
    (``mallopt(M_MMAP_THRESHOLD)``; process-wide; a no-op without glibc). Returns whether it is in effect.

    glibc raises this threshold by itself up to 32 MiB after the first big buffer is freed; from then on the
    KV batches and shards that ingest allocates and the offload writer frees (MiBs each, from several threads)
    come from the heap arenas, and what they free stays there: a week-long stream's RSS grew by ~1 GB of
    such free-but-kept heap (docs/disk-tier-results.md). A fixed threshold bounds it.
    """
    global _mmap_threshold
    if _mmap_threshold == nbytes:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        return False
    if ok:
        _mmap_threshold = nbytes
    return ok
