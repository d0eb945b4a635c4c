"""Component specs: how a configuration names a component, and the settings a component takes.

Wherever the configuration names a component (``scoring.scorer``,
``retrieval.retriever``, ``levels[i].extractor``, a backend's ``eviction``, a
model, a policy, a frame source ...) it accepts three forms:

* a registered name: ``"dual"``;
* a name with settings: ``{"name": "topk", "dedup": True, "threshold": 0.8}``.
  The settings are validated by the component's own pydantic model, its
  ``Settings`` attribute (a :class:`PluginSettings` subclass), and an invalid one
  raises :class:`~mukv.errors.ConfigError` naming the field, the component and
  the package that registered it. A component without ``Settings`` takes none;
* a Python object implementing the role's interface (an instance, a subclass,
  or for scorers a plain function). An object lives in one process only: a
  stream stored on disk records its configuration as JSON, so a session with a
  store path refuses a configuration that holds an object (register the
  component under a name instead, :func:`mukv.register_plugin`).

How the validated settings reach the component depends on its role:
:class:`~mukv.interfaces.Component` roles (extractors, scorers, compressors,
retrievers, evictors) get them through ``from_config(config, settings)``, whose
default attaches them as ``component.settings``; classes built by a constructor
(indexes, frame sources, model presets and adapters, backends) get them as
keyword arguments; a policy registered as a function gets them as keyword
arguments and returns its configuration fields.

A configuration field holding a component is declared with
:func:`component_ref`, which records its role; :func:`component_fields` finds
every such field of a configuration, and :func:`check` resolves them all
against the registry (before anything heavy loads).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Iterator

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer, ValidationError, WithJsonSchema

from .errors import ConfigError, singular

if TYPE_CHECKING:  # pragma: no cover
    from .registry import Entry, Registry

__all__ = ["PluginSettings", "Resolved", "component_ref", "component_fields", "resolve", "build", "check",
           "settings_model", "settings_defaults", "has_objects", "object_fields", "normalize", "json_safe"]


class PluginSettings(BaseModel):
    """Base class of a component's settings: typed, documented field by field, loud.

    A component declares ``Settings = MySettings`` (a subclass with a docstring per
    field and a default for each); the configuration then accepts
    ``{"name": NAME, field: value, ...}`` wherever it names the component.
    Unknown fields are errors; instances are immutable.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, validate_default=True)


@dataclass(frozen=True)
class Role:
    """Marks a configuration field as naming a component of a registry role."""

    name: str


_SCALARS = (int, float, bool, bytes, list, tuple, set)


def normalize(value: Any, optional: bool = False) -> Any:
    """A component spec in its canonical form: a name, ``{"name": ..., **settings}``
    with at least one setting, or an object.

    Raises:
        ValueError: not one of the three forms (pydantic turns it into a field error).
    """
    if value is None:
        if optional:
            return None
        raise ValueError("expected a component: a registered name, {\"name\": NAME, setting: value, ...} "
                         "or an object implementing the role's interface")
    if isinstance(value, str):
        if not value:
            raise ValueError("a component name cannot be empty")
        return value
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, Mapping):
        if "name" not in value:
            raise ValueError(f"a component given with settings needs a \"name\"; got the keys {sorted(map(str, value))}")
        name = value["name"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"a component's \"name\" must be a non-empty string; got {name!r}")
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ValueError(f"setting names must be strings; got {bad!r}")
        settings = {k: v for k, v in value.items() if k != "name"}
        return {"name": name, **settings} if settings else name
    if isinstance(value, _SCALARS):
        raise ValueError("expected a component: a registered name, {\"name\": NAME, setting: value, ...} "
                         f"or an object implementing the role's interface; got {value!r}")
    return value  # an object: checked against the role's interface when it is built


def _object_label(value: Any) -> str:
    cls = value if isinstance(value, type) else type(value)
    if callable(value) and not isinstance(value, type) and hasattr(value, "__qualname__"):
        return f"<object {getattr(value, '__module__', '?')}.{value.__qualname__}>"
    return f"<object {cls.__module__}.{cls.__qualname__}>"


def json_safe(value: Any) -> Any:
    """``value`` with every non-JSON object replaced by ``"<object module.Class>"`` (for display,
    logs and hashes; never for a stored configuration, which refuses objects)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, BaseModel):
        return json_safe(value.model_dump())
    return _object_label(value)


def _serialize(value: Any) -> Any:
    return json_safe(value)


_REF_SCHEMA = {
    "anyOf": [
        {"type": "string", "description": "a registered name"},
        {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
         "additionalProperties": True, "description": "a registered name with its settings"},
    ]
}


def component_ref(role: str, optional: bool = False) -> Any:
    """The type of a configuration field naming a component of ``role``: a name,
    ``{"name": NAME, **settings}`` or an object (see the module docstring).

    ``optional`` also accepts ``None``. Use it as a field's annotation, e.g.
    ``retriever: RetrieverRef = "semi_hierarchical"`` with
    ``RetrieverRef = component_ref("retrievers")``.
    """
    return Annotated[
        Any,
        BeforeValidator(lambda v: normalize(v, optional)),
        PlainSerializer(_serialize, when_used="json"),
        WithJsonSchema(_REF_SCHEMA if not optional else {"anyOf": [*_REF_SCHEMA["anyOf"], {"type": "null"}]}),
        Role(role),
    ]


def _role_of(field: Any) -> str | None:
    for meta in getattr(field, "metadata", ()):
        if isinstance(meta, Role):
            return meta.name
    return None


def component_fields(config: BaseModel, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """``(field path, role, value)`` of every component-naming field of a configuration
    that is set (``None`` skipped), in declaration order, through nested models and lists."""
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        path = f"{prefix}{name}"
        role = _role_of(field)
        if role is not None:
            if value is not None:
                yield path, role, value
        elif isinstance(value, BaseModel):
            yield from component_fields(value, path + ".")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from component_fields(item, f"{path}.{i}.")


def _is_object(value: Any) -> bool:
    return not isinstance(value, (str, Mapping)) and value is not None


def _nested_objects(value: Any, path: str) -> Iterator[str]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _nested_objects(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _nested_objects(v, f"{path}.{i}")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        yield path


def object_fields(config: BaseModel) -> list[str]:
    """Paths of the fields of ``config`` that hold Python objects (not JSON)."""
    out: list[str] = []
    for path, _, value in component_fields(config):
        out.extend(_nested_objects(value, path))
    return out


def has_objects(config: BaseModel) -> bool:
    """Whether ``config`` names any component by a Python object."""
    return bool(object_fields(config))


def _require_config(config: Any, what: str) -> None:
    if not isinstance(config, BaseModel):
        raise ConfigError(f"{what}: expected a configuration (a MukvConfig); got {type(config).__name__}")


def require_json(config: BaseModel, what: str) -> None:
    """Raise :class:`ConfigError` when ``config`` holds Python objects, which ``what`` cannot record."""
    _require_config(config, "require_json")
    paths = object_fields(config)
    if paths:
        raise ConfigError(
            f"{what} records its configuration as JSON, but {', '.join(paths)} "
            f"{'holds a Python object' if len(paths) == 1 else 'hold Python objects'}: register the component "
            "under a name (mukv.register_plugin) and select it by name (with settings), or use a session "
            "without a store path")


# ------------------------------------------------------------------------------ settings
def settings_model(component: Any) -> type[BaseModel] | None:
    """The pydantic model of a component's settings (its ``Settings`` attribute), or ``None``."""
    model = getattr(component, "Settings", None)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return model
    return None


def settings_defaults(component: Any) -> dict[str, Any] | None:
    """Default settings of a component as JSON values (``None``: it takes none; a field
    without a default shows as ``"<required>"``)."""
    model = settings_model(component)
    if model is None:
        return None
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if field.is_required():
            out[name] = "<required>"
        else:
            out[name] = json_safe(field.get_default(call_default_factory=True))
    return out


def _where(entry: "Entry | None") -> str:
    if entry is None:
        return ""
    return f" (plugin {entry.plugin!r}, package {entry.package})"


def format_settings_error(exc: ValidationError, field: str, role: str, name: str, entry: "Entry | None") -> str:
    """One line per invalid setting: ``field.setting: message (got value)``, after a line naming the plugin."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        shown = repr(err.get("input"))
        if len(shown) > 60:
            shown = shown[:57] + "..."
        msg = err["msg"]
        if err.get("type") == "extra_forbidden":
            msg = f"unknown setting; settings: {', '.join(_setting_names(exc, entry)) or 'none'}"
        lines.append(f"{field}.{loc}: {msg} (got {shown})" if loc else f"{field}: {msg} (got {shown})")
    return f"invalid settings of {singular(role)} {name!r}{_where(entry)}:\n  " + "\n  ".join(lines)


def _setting_names(exc: ValidationError, entry: "Entry | None") -> list[str]:
    model = settings_model(entry.component) if entry is not None else None
    return sorted(model.model_fields) if model is not None else []


def validate_settings(role: str, name: str, component: Any, raw: dict[str, Any], field: str,
                      entry: "Entry | None" = None) -> BaseModel | None:
    """``raw`` settings validated by the component's ``Settings`` (``None`` when it declares none).

    Raises:
        ConfigError: naming the field, the component and its package.
    """
    model = settings_model(component)
    if model is None:
        if raw:
            raise ConfigError(f"{field}: {singular(role)} {name!r}{_where(entry)} takes no settings; "
                              f"got {', '.join(sorted(raw))}")
        return None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_settings_error(exc, field, role, name, entry)) from None


# ------------------------------------------------------------------------------ resolution
@dataclass(frozen=True)
class Resolved:
    """A component spec resolved against the registry.

    Attributes:
        role: the registry role.
        field: the configuration field (for messages).
        name: the registered name (``None`` for an object).
        component: what was registered (class, instance, function, dict) or the object given.
        settings: the validated settings (``None``: the component declares none).
        entry: the registry entry (``None`` for an object).
    """

    role: str
    field: str
    name: str | None
    component: Any
    settings: BaseModel | None
    entry: "Entry | None"

    def kwargs(self) -> dict[str, Any]:
        """The settings as keyword arguments (for roles built by a constructor)."""
        if self.settings is None:
            return {}
        return {k: getattr(self.settings, k) for k in type(self.settings).model_fields}


def split(value: Any, field: str = "component") -> tuple[str | None, dict[str, Any], Any]:
    """``(name, settings, object)`` of a spec; exactly one of name and object is set."""
    try:
        value = normalize(value)
    except ValueError as exc:
        raise ConfigError(f"{field}: {exc}") from None
    if isinstance(value, str):
        return value, {}, None
    if isinstance(value, dict):
        return value["name"], {k: v for k, v in value.items() if k != "name"}, None
    return None, {}, value


def resolve(role: str, value: Any, field: str, reg: "Registry | None" = None) -> Resolved:
    """Look a component spec up in the registry and validate its settings.

    Raises:
        UnknownPluginError: the name is not registered (the choices are listed);
        ConfigError: invalid settings, or a name two plugins registered.
    """
    name, raw, obj = split(value, field)
    if name is None:
        return Resolved(role, field, None, obj, None, None)
    if reg is None:
        from .registry import registry

        reg = registry()
    component = reg.get(role, name, field)
    entry = reg.entries[role][name]
    return Resolved(role, field, name, component, validate_settings(role, name, component, raw, field, entry), entry)


def _accepts_settings(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "settings" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def build(role: str, value: Any, config: Any, base: type, field: str, reg: "Registry | None" = None) -> Any:
    """Build a :class:`~mukv.interfaces.Component` of ``role`` from a spec (name, name with
    settings, or object) for a session of ``config``.

    A registered class is built with ``cls.from_config(config, settings)`` (or
    ``cls.from_config(config)`` when its ``from_config`` takes no settings, which are
    then attached as ``.settings``); a registered or given instance is used as it is; for
    scorers a plain function ``f(blocks) -> [B, L]`` is wrapped.

    Raises:
        UnknownPluginError: the name is not registered.
        ConfigError: invalid settings (as :func:`resolve`), or the component does not
            implement ``base``.
    """
    from .interfaces import FunctionScorer, TokenScorer

    if not isinstance(base, type):
        raise ConfigError(f"build: base must be the interface class the component implements; got {type(base).__name__}")
    r = resolve(role, value, field, reg)
    comp = r.component
    what = f"{singular(role)} {r.name!r}{_where(r.entry)}" if r.name is not None else f"{field} ({_object_label(comp)})"
    if isinstance(comp, type):
        if not issubclass(comp, base):
            raise ConfigError(f"{what} is not a {base.__name__} subclass")
        if r.settings is not None and _accepts_settings(comp.from_config):
            obj = comp.from_config(config, settings=r.settings)
        else:
            obj = comp.from_config(config)
    elif isinstance(comp, base):
        if r.entry is not None and split(value, field)[1]:
            raise ConfigError(f"{field}: {what} is registered as a ready-made instance; its settings cannot "
                              "be changed (register its class instead)")
        return comp
    elif base is TokenScorer and callable(comp):
        return FunctionScorer(comp)
    else:
        raise ConfigError(f"{what} is neither a {base.__name__} subclass nor an instance"
                          + (" nor a function f(blocks) -> [B, L]" if base is TokenScorer else ""))
    if r.settings is not None and getattr(obj, "settings", None) is not r.settings:
        try:
            obj.settings = r.settings
        except AttributeError:  # a component that manages .settings itself
            pass
    return obj


def check(config: BaseModel, reg: "Registry | None" = None) -> list[Resolved]:
    """Resolve every component field of ``config`` (names exist, settings valid), so a
    bad configuration fails before a model loads. Objects are accepted unchecked here."""
    _require_config(config, "check")
    if reg is None:
        from .registry import registry

        reg = registry()
    return [resolve(role, value, path, reg) for path, role, value in component_fields(config)]


def canonical(resolved: Resolved) -> Any:
    """A resolved spec in its canonical form: the settings equal to their defaults dropped
    (a bare name when none is left), so that equal configurations compare and hash equal.
    Objects stay objects."""
    if resolved.name is None:
        return resolved.component
    if resolved.settings is None:
        return resolved.name
    set_values = resolved.settings.model_dump(exclude_defaults=True)
    return {"name": resolved.name, **set_values} if set_values else resolved.name


def canonicalize(config: BaseModel, reg: "Registry | None" = None) -> BaseModel:
    """``config`` with every component field resolved (see :func:`check`) and written in
    its canonical form (:func:`canonical`)."""
    _require_config(config, "canonicalize")
    data = config.model_dump()
    changed = False
    for r in check(config, reg):
        value = canonical(r)
        node: Any = data
        *parents, last = r.field.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: Any = int(last) if isinstance(node, list) else last
        if node[key] is not value and node[key] != value:
            node[key] = value
            changed = True
    return type(config).model_validate(data) if changed else config


def config_hash(config: BaseModel) -> str:
    """A short, stable hash of a configuration (objects hashed by their class name)."""
    import hashlib

    _require_config(config, "config_hash")
    text = json.dumps(json_safe(config.model_dump()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
