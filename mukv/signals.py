"""Signals while a transaction commits, and clean stops of long commands.

:func:`deferred` holds SIGINT and SIGTERM back while a few lines that must not be cut in half run
(handing a transaction to the store, rolling one back): a signal that arrives meanwhile is delivered
when the block ends. A second signal inside the block means the user insists: it is delivered at once.
Outside the main thread (where Python runs signal handlers) it does nothing.

:func:`interrupts_as_exceptions` makes SIGTERM behave like Ctrl-C (a :class:`Interrupted`, which is a
``KeyboardInterrupt``) for a command's lifetime, remembering which signal stopped it, so that
``mukv ingest`` can commit what is complete and exit 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A command was stopped by a signal (``signum``: SIGINT or SIGTERM)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """128 + the signal number (130 for SIGINT, 143 for SIGTERM), as shells report it."""
        return 128 + int(self.signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def deferred() -> Iterator[None]:
    """Deliver SIGINT/SIGTERM only after the block (see the module docstring)."""
    if not _main_thread():
        yield
        return
    caught: list[int] = []
    previous: dict[int, Any] = {}

    def hold(signum: int, frame: Any) -> None:
        caught.append(signum)
        if len(caught) >= 2:  # asked twice: stop now
            _deliver(signum, previous.get(signum), frame)

    try:
        with _blocked():  # both handlers swapped at once: a signal between the two would be raised here
            for s in _SIGNALS:
                previous[s] = signal.signal(s, hold)
    except (ValueError, OSError):  # not allowed here (e.g. an embedded interpreter)
        for s, h in previous.items():
            signal.signal(s, h)
        yield
        return
    try:
        yield
    finally:
        with _blocked():
            for s, h in previous.items():
                signal.signal(s, h)
    if caught:
        _deliver(caught[0], previous.get(caught[0]), None)


@contextmanager
def _blocked() -> Iterator[None]:
    """SIGINT and SIGTERM held back by the operating system while handlers are swapped (where the
    platform can: ``pthread_sigmask``), so neither arrives with one handler swapped and the other not;
    one that came meanwhile reaches the handlers in place after."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None:
        yield
        return
    old = mask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, old)


def _deliver(signum: int, handler: Any, frame: Any) -> None:
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL and signum == signal.SIGINT or handler is None:
        raise Interrupted(signum)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # default action (SIGTERM: terminate)
    # SIG_IGN: ignored


@contextmanager
def interrupts_as_exceptions() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread while the block runs."""
    if not _main_thread():
        yield
        return

    def raise_it(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    with _blocked():
        previous = {s: signal.signal(s, raise_it) for s in _SIGNALS}
    try:
        yield
    finally:
        with _blocked():
            for s, h in previous.items():
                signal.signal(s, h)
