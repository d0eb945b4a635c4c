"""The plugin manager and the registry of components it fills.

One :class:`pluggy.PluginManager` loads every plugin of the ``mukv``
entry-point group (mukv's built-ins are registered there too, exactly like a
third-party package) plus any plugin added at runtime with
:func:`register_plugin`. Calling the ``mukv_register_*`` hooks fills a
:class:`Registry`: for each role, a mapping from name to component and the
package that registered it.

Loading can be restricted with the environment variable ``MUKV_PLUGINS``: a
comma-separated allow-list of entry-point names (``extractors``, ``scorers``,
``my_scorer`` ...). Unset means every installed plugin; an empty string
means none.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import ConfigError, UnknownPluginError, singular

ENTRY_POINT_GROUP = "mukv"
ENV_ALLOW = "MUKV_PLUGINS"

#: Roles of the registry, in the order of the hooks that fill them.
ROLES: dict[str, str] = {
    "extractors": "mukv_register_extractors",
    "scorers": "mukv_register_scorers",
    "compressors": "mukv_register_compressors",
    "retrievers": "mukv_register_retrievers",
    "backends": "mukv_register_backends",
    "models": "mukv_register_models",
    "policies": "mukv_register_policies",
    "evictors": "mukv_register_evictors",
    "indexes": "mukv_register_indexes",
    "sources": "mukv_register_sources",
    "codecs": "mukv_register_codecs",
}


@dataclass(frozen=True)
class Entry:
    """One registered component.

    Attributes:
        name: the name it is selected by.
        component: the class, instance, function or dict that was registered.
        plugin: the name of the plugin that registered it.
        package: the distribution the plugin comes from ("<runtime>" if none).
    """

    name: str
    component: Any
    plugin: str
    package: str


@dataclass
class Registry:
    """Components by role and name, built once from the plugin hooks."""

    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {r: {} for r in ROLES})

    def get(self, role: str, name: str, field: str | None = None) -> Any:
        """Return the component registered as ``name`` for ``role``.

        Raises:
            UnknownPluginError: naming the role, the name, the config field and
                the registered choices.
        """
        try:
            return self.entries[role][name].component
        except KeyError:
            if role not in self.entries:
                raise ConfigError(f"unknown registry role {role!r}; roles: {', '.join(ROLES)}") from None
            raise UnknownPluginError(role, name, list(self.entries[role]), field) from None

    def names(self, role: str) -> list[str]:
        """Sorted names registered for ``role``."""
        return sorted(self.entries[role])

    def table(self) -> list[Entry]:
        """Every entry of every role, sorted by role then name."""
        return [self.entries[r][n] for r in ROLES for n in sorted(self.entries[r])]


_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_registry: Registry | None = None
_packages: dict[str, str] = {}  # entry-point name -> "dist version"


def _allowed() -> set[str] | None:
    raw = os.environ.get(ENV_ALLOW)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loading entry points on first use."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager("mukv")
            pm.add_hookspecs(hookspecs)
            allowed = _allowed()
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                if allowed is not None and ep.name not in allowed:
                    continue
                if pm.get_plugin(ep.name) is not None:
                    continue
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
                if ep.dist is not None:
                    _packages[ep.name] = f"{ep.dist.metadata['name']} {ep.dist.version}"
            _pm = pm
        return _pm


def _package_of(plugin_name: str) -> str:
    return _packages.get(plugin_name, "<runtime>")


def registry() -> Registry:
    """The registry filled by every loaded plugin (built once, then cached)."""
    global _registry
    with _lock:
        if _registry is None:
            pm = plugin_manager()
            reg = Registry()
            for role, hook_name in ROLES.items():
                hook = getattr(pm.hook, hook_name)
                for impl in hook.get_hookimpls():
                    plugin_name = impl.plugin_name
                    package = _package_of(plugin_name)

                    def register(name: str, component: Any, *, _role=role, _p=plugin_name, _pkg=package) -> None:
                        if not isinstance(name, str) or not name:
                            raise ConfigError(f"plugin {_p!r} registered a {singular(_role)} with an invalid name {name!r}")
                        old = reg.entries[_role].get(name)
                        if old is not None and old.component is not component:
                            raise ConfigError(
                                f"{singular(_role)} {name!r} is registered twice: by plugin {old.plugin!r} and {_p!r}"
                            )
                        reg.entries[_role][name] = Entry(name, component, _p, _pkg)

                    impl.function(register=register)
            _registry = reg
        return _registry


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Add a plugin (a module or object with ``@mukv.hookimpl`` functions) at runtime.

    The registry is rebuilt on next use, so sessions created afterwards see the
    plugin's components. Registering the same object twice is a no-op.
    """
    global _registry
    with _lock:
        pm = plugin_manager()
        if pm.is_registered(plugin):
            return
        pm.register(plugin, name=name)
        _registry = None


def unregister_plugin(plugin: object) -> None:
    """Remove a plugin added with :func:`register_plugin` (and rebuild the registry)."""
    global _registry
    with _lock:
        pm = plugin_manager()
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        _registry = None


def reset() -> None:
    """Forget the plugin manager and registry; the next use reloads entry points.

    Useful after changing ``MUKV_PLUGINS`` or installing a plugin package.
    """
    global _pm, _registry
    with _lock:
        _pm = None
        _registry = None
        _packages.clear()
