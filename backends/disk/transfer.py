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
import weakref

import numpy as np
import torch


#: smallest size class of :class:`PinnedPool` (bytes)
MIN_PINNED_CLASS = 1 << 20

_all_pools: "weakref.WeakSet[PinnedPool]" = weakref.WeakSet()


def pinned_bytes() -> int:
    """Page-locked host bytes that the disk tier's pools of this process hold, free or in use."""
    return sum(p.held_bytes for p in list(_all_pools))


def size_class(nbytes: int) -> int:
    """The buffer size that serves a request of ``nbytes``: a power of two, at least :data:`MIN_PINNED_CLASS`."""
    return max(MIN_PINNED_CLASS, 1 << max(0, int(nbytes) - 1).bit_length())


def _allocate_page_locked(nbytes: int) -> torch.Tensor:
    """``nbytes`` of ordinary host memory, page-locked with ``cudaHostRegister`` so that freeing it gives it back
    to the system (torch's own pinned allocator keeps every buffer it ever made)."""
    t = torch.empty(nbytes, dtype=torch.uint8)
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
    if int(err) != 0:
        from mukv.errors import StoreError

        raise StoreError(f"could not page-lock {nbytes} bytes of host memory for the disk tier's device copies "
                         f"(cudaHostRegister: CUDA error {int(err)}); lower pinned_free_bytes or max_pending_bytes")
    return t


def _release_page_locked(t: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


class PinnedPool:
    """Page-locked host buffers for device copies, reused and bounded.

    A request of ``n`` bytes gets a buffer of :func:`size_class` ``(n)`` bytes, so one buffer serves
    every request of its class. A returned buffer waits for reuse while the free buffers total at
    most ``max_free_bytes``; beyond that the oldest free buffers are unregistered and freed, and
    their memory goes back to the system. Pinned memory therefore stays within the bytes in flight
    (offloads queued for the writer, page-ins being uploaded) plus ``max_free_bytes``.

    Args:
        max_free_bytes: free bytes kept for reuse (0: free every buffer when it comes back).
        allocate, release: make / free one page-locked buffer of a given size (tests pass plain
            host memory; the default registers it with CUDA).
    """

    def __init__(self, max_free_bytes: int = 256 << 20, allocate=_allocate_page_locked, release=_release_page_locked):
        self._free: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []  # oldest first
        self._free_bytes = 0
        self._lock = threading.Lock()
        self.max_free_bytes = int(max_free_bytes)
        self._allocate, self._release = allocate, release
        self.held_bytes = 0  #: bytes this pool holds, free or in use
        self.allocations = 0  #: buffers made so far (a reuse makes none)
        _all_pools.add(self)

    def get(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes`` whose earlier copies have completed."""
        size = size_class(nbytes)
        with self._lock:
            for i in range(len(self._free) - 1, -1, -1):  # the most recently returned buffer of the class
                buf, ev = self._free[i]
                if buf.numel() == size:
                    del self._free[i]
                    self._free_bytes -= size
                    break
            else:
                buf = ev = None
        if buf is not None:
            if ev is not None:
                ev.synchronize()
            return buf
        buf = self._allocate(size)
        with self._lock:
            self.held_bytes += size
            self.allocations += 1
        return buf

    def put(self, buf: torch.Tensor, event: "torch.cuda.Event | None" = None) -> None:
        """Give ``buf`` back; ``event`` marks its last copy (the buffer is reused or freed only after it)."""
        dropped = []
        with self._lock:
            self._free.append((buf, event))
            self._free_bytes += buf.numel()
            while self._free_bytes > self.max_free_bytes:
                old, ev = self._free.pop(0)
                self._free_bytes -= old.numel()
                dropped.append((old, ev))
        self._drop(dropped)

    def clear(self) -> None:
        """Free every buffer waiting for reuse."""
        with self._lock:
            dropped, self._free, self._free_bytes = self._free, [], 0
        self._drop(dropped)

    def __del__(self):
        try:
            self.clear()
        except Exception:  # interpreter shutdown: CUDA may be gone already
            pass

    def _drop(self, dropped) -> None:
        for old, ev in dropped:
            if ev is not None:
                ev.synchronize()  # never unregister memory a copy still reads or writes
            size = old.numel()
            self._release(old)
            with self._lock:
                self.held_bytes -= size


_pools_lock = threading.Lock()
_pools: dict[str, tuple[PinnedPool, list[int]]] = {}  # device -> (its pool, the bound each user asked for)


def acquire_pool(device: torch.device | str, max_free_bytes: int) -> PinnedPool:
    """The process's pinned pool for ``device``, shared by every store on it (so the bound on free
    memory holds for the process, not per stream); its bound is the largest any current user asked for."""
    key = str(torch.device(device))
    with _pools_lock:
        pool, bounds = _pools.get(key, (None, []))
        if pool is None:
            pool = PinnedPool(max_free_bytes)
        bounds = [*bounds, int(max_free_bytes)]
        pool.max_free_bytes = max(bounds)
        _pools[key] = (pool, bounds)
    return pool


def release_pool(device: torch.device | str, max_free_bytes: int) -> None:
    """Undo one :func:`acquire_pool`; the last user's release frees every buffer waiting for reuse."""
    key = str(torch.device(device))
    with _pools_lock:
        pool, bounds = _pools[key]
        bounds = list(bounds)
        bounds.remove(int(max_free_bytes))
        if bounds:
            pool.max_free_bytes = max(bounds)
            _pools[key] = (pool, bounds)
            return
        del _pools[key]
        pool.max_free_bytes = 0  # buffers still in flight are freed as they come back
    pool.clear()


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
        max_free_pinned: page-locked bytes kept free for reuse by the device's shared
            :class:`PinnedPool` (see :func:`acquire_pool`).
    """

    def __init__(self, device: torch.device, max_free_pinned: int = 256 << 20):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._bound = int(max_free_pinned)
        self.pool = acquire_pool(self.device, self._bound) if self.cuda else None
        self._stream = torch.cuda.Stream(device=self.device) if self.cuda else None

    def close(self) -> None:
        """Stop using the device's pinned pool (idempotent)."""
        if self.pool is not None and self._bound is not None:
            release_pool(self.device, self._bound)
            self._bound = None

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
