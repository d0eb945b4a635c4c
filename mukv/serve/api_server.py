"""Run the application on uvicorn (what ``mukv serve`` calls).

uvicorn handles SIGINT and SIGTERM: it stops taking requests, lets open ones finish (at most
``GRACEFUL_S`` seconds), then the application's lifespan stops the engine, which closes every
stream (see :meth:`~mukv.serve.engine.Engine.stop`).
"""

from __future__ import annotations

import sys
from typing import Any

from .config import ServeConfig, is_loopback

#: seconds open requests (a streamed answer) get to finish after SIGTERM
GRACEFUL_S = 5


def run(config: ServeConfig, model: Any = None, log_level: str = "info") -> None:
    """Serve ``config.store`` until SIGINT/SIGTERM."""
    import uvicorn

    from .app import create_app

    app = create_app(config, model)
    where = f"http://{config.host if ':' not in config.host else f'[{config.host}]'}:{config.port}/"
    note = "" if is_loopback(config.host) else " (bearer token required)"
    print(f"mukv serve: {config.store} at {where}{note}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, access_log=False,
                timeout_graceful_shutdown=GRACEFUL_S, lifespan="on")
