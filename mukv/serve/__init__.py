"""``mukv serve``: a memory service for many live streams, with an HTTP API and a web page.

The package follows the layout of vLLM's entrypoints and FastAPI's bigger applications:

* :mod:`.config` -- :class:`ServeConfig`, typed and documented field by field;
* :mod:`.protocol` -- every request and response body (pydantic);
* :mod:`.app` -- :func:`create_app`: routers, errors, limits, lifespan;
* :mod:`.routers` -- one ``APIRouter`` per resource (streams, frames, ask, system, page);
* :mod:`.engine` -- the engine: one model, the streams, one loop that answers questions
  between ingest steps; it never sees HTTP;
* :mod:`.scheduler`, :mod:`.queues`, :mod:`.sources`, :mod:`.stream` -- ingest queueing,
  bounded lag and gaps, pulled sources, a stream's state;
* :mod:`.adapter` -- the one place that calls :class:`mukv.Session` and the store;
* :mod:`.metrics` -- Prometheus text format; :mod:`.media` -- decoding uploads;
* :mod:`.api_server` -- :func:`run`, uvicorn; ``static/`` -- the page.
"""

from __future__ import annotations

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "run"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "run":
        from .api_server import run

        return run
    raise AttributeError(f"module 'mukv.serve' has no attribute {name!r}")
