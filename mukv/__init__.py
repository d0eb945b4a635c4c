"""mukv: multi-grained KV-cache memory for long streaming video question answering.

The one import a plugin needs is :data:`hookimpl`; the one class an application
needs is :class:`Session`.
"""

from __future__ import annotations

from .hookspecs import hookimpl
from .errors import (
    ConfigError,
    EmptyMemoryError,
    InputError,
    MukvError,
    RetrievalError,
    StoreError,
    UnknownPluginError,
)
from .config import MukvConfig, LevelConfig
from .registry import register_plugin, unregister_plugin
from .registry import registry as get_registry
from . import malloc as _malloc

# Before any thread of the application's gets a malloc arena of its own (mukv/malloc.py says why).
_malloc.apply_environment()

__version__ = "0.1.0"

__all__ = [
    "hookimpl",
    "Session",
    "Client",
    "IngestScheduler",
    "SchedulerConfig",
    "MukvConfig",
    "LevelConfig",
    "register_plugin",
    "unregister_plugin",
    "get_registry",
    "MukvError",
    "ConfigError",
    "UnknownPluginError",
    "InputError",
    "EmptyMemoryError",
    "RetrievalError",
    "StoreError",
    "__version__",
]


def __getattr__(name: str):
    # Session pulls in torch and transformers; import it on first use only.
    if name == "Session":
        from .session import Session

        return Session
    if name in ("IngestScheduler", "SchedulerConfig"):
        from . import scheduler

        return getattr(scheduler, name)
    if name == "Client":  # needs httpx: pip install 'mukv[serve]'
        from .client import Client

        return Client
    raise AttributeError(f"module 'mukv' has no attribute {name!r}")
