"""The plugin manager and the registry of components it fills.

One :class:`pluggy.PluginManager` loads every plugin of the ``mukv``
entry-point group (mukv's built-ins are registered there too, exactly like a
third-party package) plus any plugin added at runtime with
:func:`register_plugin`. Calling the ``mukv_register_*`` hooks fills a
:class:`Registry`: for each role, a mapping from name to component and the
package that registered it.

A plugin that fails (its module does not import, a hook is misspelled or
raises, a name is taken) is skipped and reported once, as a warning on the
``mukv.registry`` logger and in :attr:`Registry.problems` (``mukv plugins``
lists it); every other component keeps working.

Loading can be restricted with the environment variable ``MUKV_PLUGINS``: a
comma-separated allow-list of entry-point names (``extractors``, ``scorers``,
``my_scorer`` ...). Unset means every installed plugin; an empty string
means none.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import ConfigError, UnknownPluginError, singular

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class Problem:
    """A plugin that could not be loaded or registered, or one name it could not have.

    Attributes:
        plugin: the plugin's name (its entry-point name, or the runtime name).
        package: the distribution it comes from ("<runtime>" if none).
        error: what went wrong, one line.
        role: for a name conflict, the role of the name (``None``: the whole plugin is skipped).
        name: for a name conflict, the name.
    """

    plugin: str
    package: str
    error: str
    role: str | None = None
    name: str | None = None

    @property
    def status(self) -> str:
        """"broken" (the whole plugin is skipped) or "conflict" (one name of it is)."""
        return "broken" if self.role is None else "conflict"


@dataclass
class Registry:
    """Components by role and name, built once from the plugin hooks.

    Attributes:
        entries: ``role -> name -> Entry`` of every usable component.
        problems: plugins skipped whole (failed to import, to validate, or raised in a
            hook) and names refused because two packages registered them.
        conflicts: ``(role, name) -> message`` of names that two third-party packages
            registered; selecting one raises :class:`~mukv.errors.ConfigError` naming both.
    """

    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {r: {} for r in ROLES})
    problems: list[Problem] = field(default_factory=list)
    conflicts: dict[tuple[str, str], str] = field(default_factory=dict)

    def get(self, role: str, name: str, field: str | None = None) -> Any:
        """Return the component registered as ``name`` for ``role``.

        Raises:
            UnknownPluginError: naming the role, the name, the config field and
                the registered choices.
            ConfigError: two third-party packages registered ``name`` (both are named).
        """
        try:
            return self.entries[role][name].component
        except KeyError:
            if role not in self.entries:
                raise ConfigError(f"unknown registry role {role!r}; roles: {', '.join(self.entries)}") from None
            if (role, name) in self.conflicts:
                where = f" (config field {field!r})" if field else ""
                raise ConfigError(f"{self.conflicts[(role, name)]}{where}") from None
            raise UnknownPluginError(role, name, list(self.entries[role]), field) from None
        except TypeError:  # an unhashable name (a list, a dict)
            raise ConfigError(f"{singular(role)} name must be a string; got {name!r}"
                              + (f" (config field {field!r})" if field else "")) from None

    def names(self, role: str) -> list[str]:
        """Sorted names registered for ``role``."""
        return sorted(self.entries[role])

    def table(self) -> list[Entry]:
        """Every entry of every role, sorted by role then name."""
        return [self.entries[r][n] for r in self.entries for n in sorted(self.entries[r])]

    @property
    def broken(self) -> list[Problem]:
        """Plugins skipped whole."""
        return [p for p in self.problems if p.role is None]


_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_registry: Registry | None = None
_packages: dict[str, str] = {}  # plugin name -> "dist version"
_builtin: set[str] = set()  # plugin names that come from mukv itself
_load_problems: list[Problem] = []  # entry points that failed to load


def _allowed() -> set[str] | None:
    raw = os.environ.get(ENV_ALLOW)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def hook_names() -> list[str]:
    """Every hook of :mod:`mukv.hookspecs`."""
    return sorted(n for n in dir(hookspecs) if n.startswith("mukv_") and callable(getattr(hookspecs, n)))


def check_hook_names(plugin: object, plugin_name: str = "plugin") -> None:
    """Raise :class:`ConfigError` when ``plugin`` has a function named like a hook
    (``mukv_...``) that is not one, naming the closest real hook."""
    hooks = hook_names()
    for attr in dir(plugin):
        if not attr.startswith("mukv_") or attr in hooks:
            continue
        try:
            value = getattr(plugin, attr)
        except Exception:  # a property that raises: not a hook either way
            continue
        if callable(value):
            closest = difflib.get_close_matches(attr, hooks, n=1, cutoff=0.0)
            raise ConfigError(f"plugin {plugin_name!r} defines {attr}(), which is not a mukv hook; "
                              f"did you mean {closest[0]}? (hooks: {', '.join(hooks)})")


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loading entry points on first use.

    An entry point that fails to import, defines a misspelled hook or does not
    validate against the hook specifications is skipped and reported once (a
    warning on the ``mukv.registry`` logger, and in :attr:`Registry.problems`);
    every other plugin loads.
    """
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager("mukv")
            pm.add_hookspecs(hookspecs)
            allowed = _allowed()
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                if allowed is not None and ep.name not in allowed:
                    continue
                dist = getattr(ep, "dist", None)
                package = f"{dist.metadata['name']} {dist.version}" if dist is not None else "<unknown>"
                if pm.get_plugin(ep.name) is not None or ep.name in {p.plugin for p in _load_problems}:
                    if _packages.get(ep.name) == package:  # the same distribution seen twice on sys.path
                        continue
                    other = _packages.get(ep.name, "another package")
                    _report(Problem(ep.name, package, f"entry point {ep.name!r} is also defined by {other}; "
                                    "this one is skipped"), _load_problems)
                    continue
                try:
                    plugin = ep.load()
                    check_hook_names(plugin, ep.name)
                    pm.register(plugin, name=ep.name)
                except (Exception, SystemExit) as exc:  # a plugin's failure never takes mukv down
                    _report(Problem(ep.name, package, _describe(exc)), _load_problems)
                    continue
                _packages[ep.name] = package
                if dist is not None and dist.metadata["name"] == "mukv":
                    _builtin.add(ep.name)
                log.debug("loaded plugin %s from %s", ep.name, package)
            _pm = pm
        return _pm


def _report(problem: Problem, into: list[Problem]) -> None:
    into.append(problem)
    if problem.role is None:
        log.warning("plugin %r (package %s) is skipped: %s", problem.plugin, problem.package, problem.error)
    else:
        log.warning("%s", problem.error)


def _package_of(plugin_name: str) -> str:
    return _packages.get(plugin_name, "<runtime>")


def _collect(pm: pluggy.PluginManager, problems: list[Problem]) -> tuple[dict[str, list], list[str]]:
    """Call every registration hook; return ``plugin -> [(role, name, component)]`` and the
    plugin order. A plugin whose hook raises (or registers an invalid name) is dropped whole."""
    staged: dict[str, list[tuple[str, str, Any]]] = {}
    failed: set[str] = set()
    order: list[str] = []
    for role, hook_name in ROLES.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            plugin_name = impl.plugin_name
            if plugin_name in failed:
                continue
            if plugin_name not in staged:
                staged[plugin_name] = []
                order.append(plugin_name)
            items: list[tuple[str, str, Any]] = []

            def register(name: str, component: Any, *, _role: str = role, _p: str = plugin_name,
                         _items: list = items) -> None:
                if not isinstance(name, str) or not name:
                    raise ConfigError(f"registered a {singular(_role)} with an invalid name {name!r}")
                for r, n, c in _items:
                    if r == _role and n == name and c is not component:
                        raise ConfigError(f"registered the {singular(_role)} {name!r} twice")
                _items.append((_role, name, component))

            try:
                impl.function(register=register)
            except (Exception, SystemExit) as exc:
                failed.add(plugin_name)
                staged.pop(plugin_name, None)
                _report(Problem(plugin_name, _package_of(plugin_name), f"{hook_name} failed: {_describe(exc)}"),
                        problems)
                continue
            staged[plugin_name].extend(items)
    return staged, [p for p in order if p in staged]


def _build(pm: pluggy.PluginManager) -> Registry:
    reg = Registry()
    reg.problems.extend(_load_problems)
    staged, order = _collect(pm, reg.problems)
    # mukv's own plugins first: a third-party package cannot take a built-in's name
    order.sort(key=lambda p: p not in _builtin)
    claims: dict[tuple[str, str], list[Entry]] = {}
    for plugin_name in order:
        for role, name, component in staged[plugin_name]:
            claims.setdefault((role, name), []).append(Entry(name, component, plugin_name,
                                                             _package_of(plugin_name)))
    for (role, name), entries in claims.items():
        first = entries[0]
        others = [e for e in entries[1:] if e.component is not first.component]
        if not others:
            reg.entries[role][name] = first
            continue
        who = " and ".join(f"plugin {e.plugin!r} ({e.package})" for e in [first, *others])
        if first.plugin in _builtin:
            reg.entries[role][name] = first
            for e in others:
                _report(Problem(e.plugin, e.package, f"{singular(role)} {name!r} is registered by {who}; "
                                f"mukv's own is kept and the one from {e.plugin!r} is ignored", role, name), reg.problems)
        else:
            message = (f"{singular(role)} {name!r} is registered by {who}; uninstall one, or leave one out "
                       f"with {ENV_ALLOW}")
            reg.conflicts[(role, name)] = message
            for e in [first, *others]:
                _report(Problem(e.plugin, e.package, message, role, name), reg.problems)
    return reg


def registry() -> Registry:
    """The registry filled by every loaded plugin (built once, then cached).

    A plugin whose hook raises is skipped whole and reported; a name registered by
    two packages is reported and refused (mukv's own built-in keeps its name; between
    two third-party packages, selecting the name raises naming both).
    """
    global _registry
    with _lock:
        if _registry is None:
            _registry = _build(plugin_manager())
        return _registry


def _check_plugin(plugin: object, what: str) -> None:
    if plugin is None or isinstance(plugin, (str, bytes, bytearray, int, float, complex)):
        raise ConfigError(f"{what}: a plugin is a module or an object with @mukv.hookimpl functions; got "
                          f"{type(plugin).__name__}")


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Add a plugin (a module or object with ``@mukv.hookimpl`` functions) at runtime.

    The registry is rebuilt on next use, so sessions created afterwards see the
    plugin's components. Registering the same object twice is a no-op.

    Raises:
        ConfigError: the plugin is not a module or object, defines no hook or a misspelled
            one, does not validate against the hook specifications, raises in a hook, or
            registers a name that is taken; it is then not registered.
    """
    global _registry
    _check_plugin(plugin, "register_plugin")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ConfigError(f"register_plugin: name must be a non-empty string or None; got {name!r}"[:200])
    with _lock:
        pm = plugin_manager()
        if pm.is_registered(plugin):
            return
        label = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        check_hook_names(plugin, label)
        try:
            plugin_name = pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise ConfigError(f"plugin {label!r} cannot be registered: {_describe(exc)}") from None
        if not pm.get_hookcallers(plugin):
            pm.unregister(plugin)
            raise ConfigError(f"plugin {label!r} defines no @mukv.hookimpl function (hooks: {', '.join(hook_names())}): "
                              "nothing to register")
        _registry = None
        reg = registry()
        mine = [p for p in reg.problems if p.plugin == plugin_name and p not in _load_problems]
        if mine:
            pm.unregister(plugin)
            _registry = None
            raise ConfigError(f"plugin {label!r} was not registered: " + "; ".join(p.error for p in mine))


def unregister_plugin(plugin: object) -> None:
    """Remove a plugin added with :func:`register_plugin` (and rebuild the registry); a plugin that
    is not registered is left as it is."""
    global _registry
    _check_plugin(plugin, "unregister_plugin")
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
        _builtin.clear()
        _load_problems.clear()
