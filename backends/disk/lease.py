"""One writer per stream on an object store: a lease kept in the stream's own state file.

A local store marks its writer with ``flock`` (:class:`~.files.WriterLock`); an object store
has no locks, so several processes (``mukv serve`` on several machines over one ``s3://``
store) agree on each stream's writer through the store's conditional writes instead:

* The stream's state file ``streams/<id>.json`` carries a ``lease`` entry: who writes the
  stream, a fresh nonce, the lease's length and its expiry (the holder's wall clock).
* Every write of the state file is conditional on the ETag of the last version this writer
  wrote or read (``If-Match``; ``If-None-Match: *`` for a stream's first state). A state file
  written by anyone else in between makes the write fail: a writer that lost its lease can
  never commit (the write is *fenced*). The nonce makes every version's bytes, and so its
  ETag, unique.
* The holder renews the lease every ``ttl / 3`` seconds (a conditional rewrite of the same
  state with a later expiry) from a daemon thread, and before every commit: a commit starts
  only after a successful conditional renewal, so a writer that lost its stream writes no KV
  and no index rows, and the commit runs inside a lease nobody else may take. The holder
  stops committing ``ttl / 3`` before its last renewal would expire (its own monotonic clock).
  What this cannot exclude is a writer that stalls for longer than ``ttl / 3`` between that
  renewal and a write it has already started (a process frozen in the middle of a PUT): keep
  ``lease_ttl`` well above the longest stall you expect.
* Another process takes a stream over when its lease is released (a clean close writes an
  empty lease), when the holder's recorded expiry is more than ``clock_skew`` seconds past,
  or when the same version of the state file has been seen unchanged for longer than the
  lease (:meth:`StreamLease.try_acquire` called again and again; this needs no clocks to
  agree). The takeover is itself a conditional write on the version it saw.

No lock file of mukv's own is involved: the object store's compare-and-swap decides.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from mukv.errors import ConfigError, StoreError, expect_number


def default_owner() -> str:
    """``host:pid``: how a writer names itself in a lease."""
    return f"{socket.gethostname()}:{os.getpid()}"


class LeaseHeld(StoreError):
    """The stream's lease is held by another live writer."""

    def __init__(self, message: str, owner: str | None, expires: float | None):
        super().__init__(message)
        self.owner, self.expires = owner, expires


class StreamLease:
    """The lease on one stream's state file (see the module docstring).

    Args:
        files: the store's :class:`~.files.Files` (remote).
        rel: the state file, relative to the store root.
        ttl: seconds a lease lasts without renewal.
        owner: this writer's name (default ``host:pid``).
        clock_skew: seconds by which clocks of different machines may differ; a lease whose
            recorded expiry is older than this is taken at once.
        on_lost: called (on the renewal thread) with a message when the lease is lost.
    """

    def __init__(self, files: Any, rel: str, ttl: float = 30.0, owner: str | None = None,
                 clock_skew: float = 10.0, on_lost: Callable[[str], None] | None = None):
        if not hasattr(files, "remote") or not callable(getattr(files, "uri", None)):
            raise StoreError(f"a stream lease needs the store's Files; got {type(files).__name__}")
        if not files.remote:
            raise StoreError("a stream lease is for object stores; local stores use a writer lock")
        if not isinstance(rel, str) or not rel:
            raise StoreError(f"a stream lease needs the state file's path in the store; got {rel!r}"[:200])
        for name, value in (("ttl", ttl), ("clock_skew", clock_skew)):
            expect_number(value, f"lease {name}", lo=0, unit=" of seconds", error=ConfigError)
        if owner is not None and (not isinstance(owner, str) or not owner):
            raise ConfigError(f"lease owner must be a non-empty string; got {owner!r}"[:200])
        if on_lost is not None and not callable(on_lost):
            raise ConfigError(f"on_lost must be a callable or None; got {type(on_lost).__name__}")
        self.files, self.rel, self.ttl = files, rel, float(ttl)
        self.owner = owner or default_owner()
        self.clock_skew = float(clock_skew)
        self.on_lost = on_lost
        self._lock = threading.RLock()
        self._etag: str | None = None  # the version of the state file this writer last wrote
        self._state: dict[str, Any] | None = None  # its content, without the lease entry
        self._valid_until = 0.0  # monotonic
        self._seen: tuple[str | None, float] | None = None  # (etag, first seen, monotonic) of a held lease
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ object store calls
    def _get(self) -> tuple[dict[str, Any] | None, str | None]:
        import obstore

        try:
            got = obstore.get(self.files.object_store, self.rel)
            raw, etag = bytes(got.bytes()), got.meta.get("e_tag")
        except FileNotFoundError:
            return None, None
        except Exception as exc:
            if "not found" in str(exc).lower() or "NotFound" in type(exc).__name__:
                return None, None
            raise StoreError(f"{self.files.uri(self.rel)}: cannot read ({exc})") from None
        try:
            value = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(f"{self.files.uri(self.rel)}: not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise StoreError(f"{self.files.uri(self.rel)}: expected a JSON object")
        return value, etag

    def _put(self, state: dict[str, Any], lease: dict[str, Any], etag: str | None) -> str | None:
        """Write ``state`` with ``lease`` if the file is still at ``etag`` (absent: ``None``).
        Returns the new ETag, or ``None`` when the condition failed."""
        import obstore

        body = dict(state)
        body["lease"] = {**lease, "nonce": uuid.uuid4().hex}
        data = json.dumps(body, indent=1, sort_keys=True).encode()
        mode: Any = "create" if etag is None else {"e_tag": etag}
        try:
            out = obstore.put(self.files.object_store, self.rel, data, mode=mode)
        except Exception as exc:
            name = type(exc).__name__
            if name in ("AlreadyExistsError", "PreconditionError") or "precondition" in str(exc).lower():
                return None
            raise StoreError(f"{self.files.uri(self.rel)}: cannot write ({exc})") from None
        return out.get("e_tag") or ""

    def _lease(self, expires_in: float | None) -> dict[str, Any]:
        if expires_in is None:
            return {"owner": None, "expires": None, "ttl": self.ttl}
        return {"owner": self.owner, "expires": time.time() + expires_in, "ttl": self.ttl}

    # ------------------------------------------------------------------ taking and keeping
    def try_acquire(self) -> bool:
        """Take the lease if it is free, released or expired; ``False`` while another writer holds it.

        Call it again and again to take over a stream whose writer died: a lease seen unchanged
        for longer than its length is taken even when clocks disagree.
        """
        with self._lock:
            if self._etag is not None and self.lost is None:
                return True
            state, etag = self._get()
            lease = (state or {}).get("lease") or {}
            holder, expires = lease.get("owner"), lease.get("expires")
            now = time.monotonic()
            if state is not None and holder is not None and holder != self.owner:
                stale_clock = isinstance(expires, (int, float)) and time.time() > expires + self.clock_skew
                if self._seen is None or self._seen[0] != etag:
                    self._seen = (etag, now)
                ttl = float(lease.get("ttl") or self.ttl)
                stale_seen = now - self._seen[1] > ttl
                if not (stale_clock or stale_seen):
                    return False
            content = {k: v for k, v in (state or {}).items() if k != "lease"}
            t0 = time.monotonic()
            new = self._put(content, self._lease(self.ttl), etag)
            if new is None:  # someone else wrote it meanwhile
                self._seen = None
                return False
            self._etag, self._state, self._seen, self.lost = new, content, None, None
            self._valid_until = t0 + self.ttl - self.ttl / 3
            self._start_renewal()
            return True

    def acquire(self) -> None:
        """Take the lease or raise :class:`LeaseHeld` naming its holder."""
        if not self.try_acquire():
            state, _ = self._get()
            lease = (state or {}).get("lease") or {}
            exp = lease.get("expires")
            left = f", lease valid for {max(0.0, exp - time.time()):.0f} s more" if isinstance(exp, (int, float)) else ""
            raise LeaseHeld(f"{self.files.uri(self.rel)}: the stream is being written by {lease.get('owner')!r}{left}",
                            lease.get("owner"), exp)

    def _start_renewal(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._renew_loop, name=f"mukv-lease-{self.rel}", daemon=True)
            self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except StoreError:
                pass  # a transient error: the next round tries again; validity runs out meanwhile

    def renew(self) -> None:
        """Rewrite the state with a later expiry (conditional on this writer's last version)."""
        with self._lock:
            if self._etag is None or self.lost is not None:
                return
            t0 = time.monotonic()
            new = self._put(self._state or {}, self._lease(self.ttl), self._etag)
            if new is None:
                self._lose("another writer took the stream over (its state file changed under this writer)")
                return
            self._etag = new
            self._valid_until = t0 + self.ttl - self.ttl / 3

    def hand_over(self) -> None:
        """Stop renewing without releasing: a writer of the same owner takes the lease at once (a
        probe that won a stream hands it to the stream's writer session)."""
        self._stop.set()
        with self._lock:
            self._etag = None

    def _lose(self, why: str) -> None:
        self.lost = f"{self.files.uri(self.rel)}: lease lost: {why}"
        self._etag = None
        self._stop.set()
        if self.on_lost is not None:
            try:
                self.on_lost(self.lost)
            except Exception:  # noqa: BLE001 - a callback must not kill the renewal thread
                pass

    @property
    def held(self) -> bool:
        """Whether this writer holds a lease it may still commit under."""
        return self._etag is not None and self.lost is None and time.monotonic() < self._valid_until

    def confirm(self) -> None:
        """Renew now (a conditional write) and raise :class:`StoreError` unless the lease is held:
        called before each commit, so a writer that lost its stream writes nothing at all, and the
        commit that follows has a whole lease before anyone may take the stream."""
        self.renew()
        self.check()

    def check(self) -> None:
        """Raise :class:`StoreError` unless :attr:`held`."""
        if self.lost is not None:
            raise StoreError(self.lost)
        if not self.held:
            raise StoreError(f"{self.files.uri(self.rel)}: the lease ran out before it could be renewed "
                             "(object store unreachable?); nothing more is committed")

    # ------------------------------------------------------------------ the fenced write
    def write_state(self, state: dict[str, Any]) -> None:
        """Commit a new state: a conditional write that fails if this writer lost the stream."""
        with self._lock:
            self.check()
            t0 = time.monotonic()
            new = self._put(state, self._lease(self.ttl), self._etag)
            if new is None:
                self._lose("another writer took the stream over before this commit")
                raise StoreError(self.lost)
            self._etag, self._state = new, dict(state)
            self._valid_until = t0 + self.ttl - self.ttl / 3

    def release(self) -> None:
        """Give the lease up (after the last commit): another writer may take the stream at once."""
        self._stop.set()
        with self._lock:
            if self._etag is None or self.lost is not None:
                return
            try:
                self._put(self._state or {}, self._lease(None), self._etag)
            except StoreError:
                pass  # it expires by itself
            self._etag = None
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
