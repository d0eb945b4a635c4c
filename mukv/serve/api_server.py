"""Run the application on uvicorn (what ``mukv serve`` calls).

uvicorn handles SIGINT and SIGTERM: it stops taking requests, lets open ones finish (at most
``GRACEFUL_S`` seconds), then the application's lifespan stops the engine, which closes every
stream (see :meth:`~mukv.serve.engine.Engine.stop`). The process then exits as mukv's commands
do after an interrupt: 143 after SIGTERM, 130 after SIGINT.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from ..errors import ConfigError
from .config import ServeConfig, is_loopback

#: seconds open requests (a streamed answer) get to finish after SIGTERM
GRACEFUL_S = 5


def run(config: ServeConfig, model: Any = None, log_level: str = "info") -> None:
    """Serve ``config.store`` until SIGINT/SIGTERM."""
    import socket

    import uvicorn

    from .app import create_app
    from .engine import Engine

    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    with socket.socket(family) as probe:  # a port in use fails here, in one line, before the model loads
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((config.host, config.port))
        except OSError as exc:  # a port in use or not ours to take, a host name that does not resolve
            raise ConfigError(f"serve: cannot listen on {config.host!r} port {config.port}: "
                              f"{exc.strerror or exc}") from None
    engine = Engine(config, model)
    engine.load()  # a bad model or store fails here, as a mukv error, before uvicorn starts
    app = create_app(config, engine=engine)
    where = f"http://{config.host if ':' not in config.host else f'[{config.host}]'}:{config.port}/"
    note = "" if is_loopback(config.host) else " (bearer token required)"
    print(f"mukv serve: {config.store} at {where}{note}", file=sys.stderr, flush=True)
    # uvicorn raises the signal it caught again once it has shut down, under the handler that was
    # there before it: make that an exit with status 128 + signal
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _exit_after_signal) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, access_log=False,
                    timeout_graceful_shutdown=GRACEFUL_S, lifespan="on")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _exit_after_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)
