"""The user's settings for the ``mukv`` command: a configuration file, ``MUKV_*`` environment
variables and the command line, layered with a documented precedence.

Each value comes from the first of these that sets it (highest first):

1. the command line (``--model``, ``--policy``, ``--config``, ``--device``, ``--log-questions`` ...);
2. environment variables: ``MUKV_MODEL``, ``MUKV_POLICY``, ``MUKV_DEVICE``, ``MUKV_BACKEND``,
   ``MUKV_BACKEND_OPTIONS`` (JSON), ``MUKV_QUESTION_LOG``, and ``MUKV_CONFIG`` (a JSON object of
   configuration fields) or one field at a time, ``MUKV_CONFIG__RETRIEVAL__RETRIEVER=cosine``
   (``__`` separates the levels);
3. the user file: ``$MUKV_CONFIG_FILE``, else the first of ``config.toml``, ``config.yaml``,
   ``config.yml``, ``config.json`` in ``$XDG_CONFIG_HOME/mukv`` (``~/.config/mukv``);
4. mukv's defaults.

The configuration fields (``config``) merge rather than replace: the command line's
``--config`` goes over the environment's, over the file's, over the policy's fields, over
the model's own defaults (``mukv_config.json`` of its checkpoint), over mukv's defaults.

A stream that is opened again keeps what it stored: of the file's and the environment's
configuration only ``retrieval``, ``assembly`` and ``generation`` apply to it (the rest is
for new streams), and ``--config`` / ``--policy`` may change only what
:meth:`mukv.Session.fork` allows, else the command fails naming the fields.

The Python API reads none of this on its own (a library should not change behaviour
because of a file its caller did not name); :func:`load` gives an application the same
layers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from .config import MukvConfig, format_validation_error, merge, policy_fields
from .errors import ConfigError, InputError, expect

#: Environment variable naming the user file (overrides the default locations).
ENV_FILE = "MUKV_CONFIG_FILE"
#: Names of the user file looked for in the configuration folder, in this order.
FILE_NAMES = ("config.toml", "config.yaml", "config.yml", "config.json")
#: Configuration sections a reopened stream takes from the user file and the environment.
REOPEN_SECTIONS = ("retrieval", "assembly", "generation")


class UserSettings(BaseSettings):
    """What the user file and ``MUKV_*`` variables may set (every field optional)."""

    model_config = SettingsConfigDict(env_prefix="MUKV_", env_nested_delimiter="__", extra="forbid",
                                      use_attribute_docstrings=True, case_sensitive=False)

    model: str | dict[str, Any] | None = None
    """Model of new sessions and stores: a preset, a checkpoint directory, or either with
    settings (``{"name": ..., "parity": "authors"}``). Default: mukv-tiny."""

    policy: str | dict[str, Any] | None = None
    """Policy of new sessions and stores (a name, or a name with settings). Default: mukv."""

    config: dict[str, Any] = Field(default_factory=dict)
    """Configuration fields (:class:`mukv.config.MukvConfig`), applied over the policy."""

    device: str | None = None
    """Torch device ("cpu", "cuda", "cuda:1"). Default: CUDA if available, else CPU."""

    backend: str | None = None
    """Backend of new stores. Default: lancedb."""

    backend_options: dict[str, Any] = Field(default_factory=dict)
    """Backend options (e.g. ``storage_options`` of an ``s3://`` store, ``hot_bytes``)."""

    question_log: bool = False
    """Keep a question log in the store for every question the command answers."""


@dataclass
class Layer:
    """One source of settings: its label ("file ~/.config/mukv/config.toml", "env", ...) and values."""

    label: str
    values: dict[str, Any]
    #: for the environment: which variable set each top-level field
    origin: dict[str, str] = field(default_factory=dict)


def user_file() -> Path | None:
    """The user file in use (``None``: there is none).

    Raises:
        ConfigError: ``$MUKV_CONFIG_FILE`` names a file that does not exist.
    """
    named = os.environ.get(ENV_FILE)
    if named:
        p = Path(named).expanduser()
        if not p.is_file():
            raise ConfigError(f"{ENV_FILE}={named}: no such file")
        return p
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "mukv"
    for name in FILE_NAMES:
        if (base / name).is_file():
            return base / name
    return None


def read_file(path: str | Path, what: str | None = None) -> dict[str, Any]:
    """A JSON, TOML or YAML file holding one object (chosen by suffix; anything else is read as
    JSON, then TOML, then YAML).

    Raises:
        InputError: missing, unreadable, invalid, or not an object (the message names the file).
    """
    expect(path, (str, Path), "read_file: path")
    p = Path(path).expanduser()
    what = what or str(p)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise InputError(f"{what}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{what}: cannot be read ({exc})") from None
    suffix = p.suffix.lower()
    readers = {".json": [_json], ".toml": [_toml], ".yaml": [_yaml], ".yml": [_yaml]}.get(suffix,
                                                                                         [_json, _toml, _yaml])
    errors = []
    for reader in readers:
        try:
            value = reader(text)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        if not isinstance(value, dict):
            raise InputError(f"{what}: expected an object (a table / mapping) of settings; got "
                             f"{type(value).__name__}")
        return value
    raise InputError(f"{what}: " + "; ".join(errors))


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def _toml(text: str) -> Any:
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"invalid TOML ({exc})") from None


def _yaml(text: str) -> Any:
    try:
        import yaml
    except ImportError:  # pragma: no cover - a dependency of mukv
        raise ValueError("YAML needs PyYAML: pip install pyyaml") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"invalid YAML ({' '.join(str(exc).split())})") from None


def parse_object(raw: str | None, flag: str = "--config") -> dict[str, Any] | None:
    """A command-line value holding an object: inline JSON (``{...}``), or the path of a JSON,
    TOML or YAML file.

    Raises:
        InputError: neither, or not an object.
    """
    if raw is not None:
        expect(raw, str, f"{flag}: the value")
    if raw is None:
        return None
    if raw.lstrip().startswith("{"):
        try:
            value = _json(raw)
        except ValueError as exc:
            raise InputError(f"{flag}: {exc}") from None
        if not isinstance(value, dict):  # pragma: no cover - a "{" always parses to a dict
            raise InputError(f"{flag}: expected a JSON object")
        return value
    if not Path(raw).expanduser().is_file():
        raise InputError(f"{flag}: {raw!r} is neither a JSON object nor a JSON, TOML or YAML file")
    return read_file(raw, f"{flag} {raw}")


def parse_spec(raw: str | None, flag: str) -> str | dict[str, Any] | None:
    """A command-line value naming a component: a name, or a JSON object ``{"name": ..., ...}``."""
    if raw is None:
        return None
    if raw.lstrip().startswith("{"):
        return parse_object(raw, flag)
    return raw


def _validate(values: dict[str, Any], label: str) -> dict[str, Any]:
    try:
        UserSettings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc).replace("invalid mukv configuration", f"invalid settings in {label}"))
    return values


def file_layer() -> Layer | None:
    """The user file's settings (``None``: no file)."""
    path = user_file()
    if path is None:
        return None
    label = f"file {path}"
    return Layer(label, _validate(read_file(path, label), label))


def env_layer() -> Layer:
    """The ``MUKV_*`` variables' settings (``MUKV_PLUGINS``, ``MUKV_MALLOC_ARENA_MAX`` and
    ``MUKV_CONFIG_FILE`` are read elsewhere)."""
    class _Env(UserSettings):
        model_config = ConfigDict(extra="ignore")  # type: ignore[assignment]

    try:
        values = EnvSettingsSource(_Env)()
    except Exception as exc:  # pydantic-settings' SettingsError: a value that is not valid JSON
        raise ConfigError(f"environment: {' '.join(str(exc).split())}") from None
    origin = {}
    for key in values:
        names = sorted(k for k in os.environ if k.upper() == f"MUKV_{key.upper()}"
                       or k.upper().startswith(f"MUKV_{key.upper()}__"))
        origin[key] = "env " + ", ".join(names)
    return Layer("env", _validate(values, "the environment (MUKV_*)"), origin)


def load() -> UserSettings:
    """The user file and the environment, merged (the environment wins), validated."""
    layers = [lay for lay in (file_layer(), env_layer()) if lay is not None]
    return UserSettings.model_validate(_merge_layers(layers))


def _merge_layers(layers: list[Layer]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for lay in layers:
        out = merge(out, lay.values)
    return out


# ------------------------------------------------------------------------------ effective settings
@dataclass
class Effective:
    """The settings a command uses, each with the source it came from.

    Attributes:
        values: ``model``, ``policy``, ``device``, ``backend``, ``backend_options``,
            ``question_log`` as they will be used (``None``: mukv's default).
        sources: the source of each of ``values``.
        config: the configuration fields given by the user (file, environment, command
            line), merged, to apply over the policy.
        config_layers: ``(source, fields)`` of each of them, lowest first.
    """

    values: dict[str, Any]
    sources: dict[str, str]
    config: dict[str, Any]
    config_layers: list[tuple[str, dict[str, Any]]]


def effective(cli: dict[str, Any] | None = None, reopen: bool = False) -> Effective:
    """Layer the user file, the environment and the command line's values ``cli`` (keys of
    :class:`UserSettings`; ``None`` values are unset).

    With ``reopen`` (a stored stream), only the ``retrieval``, ``assembly`` and ``generation``
    sections of the file's and the environment's ``config`` are kept.

    Raises:
        ConfigError: an invalid value, naming where it came from.
    """
    layers = [lay for lay in (file_layer(), env_layer()) if lay is not None]
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    _validate(cli, "the command line")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in ("model", "policy", "device", "backend", "backend_options", "question_log"):
        values[key], sources[key] = None, "default"
        for lay in layers:
            if key in lay.values:
                values[key], sources[key] = lay.values[key], lay.origin.get(key, lay.label)
        if key in cli:
            values[key], sources[key] = cli[key], "command line"
    config_layers = []
    for lay in layers:
        cfg = dict(lay.values.get("config") or {})
        if reopen:
            cfg = {k: v for k, v in cfg.items() if k in REOPEN_SECTIONS}
        if cfg:
            config_layers.append((lay.origin.get("config", lay.label), cfg))
    if cli.get("config"):
        config_layers.append(("--config", dict(cli["config"])))
    merged: dict[str, Any] = {}
    for _, cfg in config_layers:
        merged = merge(merged, cfg)
    return Effective(values, sources, merged, config_layers)


def model_defaults(model: Any) -> tuple[dict[str, Any], str]:
    """The configuration fields a model brings, without loading it: ``(fields, label)``.

    Read from a checkpoint directory's ``mukv_config.json``, or from a preset's
    ``defaults()`` attribute when it has one (mukv-tiny); empty otherwise.
    """
    from .model import read_model_defaults
    from .registry import registry
    from .specs import split

    if model is None:
        from .session import DEFAULT_MODEL

        model = DEFAULT_MODEL
    if hasattr(model, "default_config"):  # an adapter
        return dict(model.default_config or {}), f"model {getattr(model, 'name', '?')}"
    name, _, _ = split(model, "model")
    if name is None:
        raise ConfigError(f"model must be a registered model name, a checkpoint directory or a model adapter; got "
                          f"{type(model).__name__}")
    label = f"model {name}"
    entry = registry().entries["models"].get(name)
    if entry is not None:
        fn = getattr(entry.component, "defaults", None)
        return (dict(fn() or {}) if callable(fn) else {}), label
    if Path(name).is_dir():
        return read_model_defaults(name), label
    return {}, label


# ------------------------------------------------------------------------------ provenance
def with_sources(layers: list[tuple[str, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge ``(source, fields)`` layers as :func:`mukv.config.merge` does and record which
    source set each leaf: ``(merged, {"retrieval.retriever": "--config", ...})``. A list or a
    component of another name replaces what was under it whole, so its leaves take the new source."""
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, fields in layers:
        _merge_into(merged, fields, "", source, origin)
    return merged, origin


def _merge_into(base: dict[str, Any], over: dict[str, Any], prefix: str, source: str, origin: dict[str, str]) -> None:
    for key, value in over.items():
        path = f"{prefix}{key}"
        cur = base.get(key)
        other = isinstance(value, dict) and isinstance(cur, dict) and "name" in value and "name" in cur \
            and value["name"] != cur["name"]
        if isinstance(value, dict) and isinstance(cur, dict) and not other:
            _merge_into(cur, value, path + ".", source, origin)
            continue
        for k in [k for k in origin if k == path or k.startswith(path + ".")]:
            del origin[k]
        base[key] = json.loads(json.dumps(value, default=str)) if isinstance(value, (dict, list)) else value
        _record(value, path, source, origin)


def _record(value: Any, path: str, source: str, origin: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _record(v, f"{path}.{k}", source, origin)
    elif isinstance(value, list) and value:
        for i, v in enumerate(value):
            _record(v, f"{path}.{i}", source, origin)
    else:
        origin[path] = source


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.0.c": leaf, ...}`` of a nested JSON value."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: value}


def source_of(path: str, origin: dict[str, str]) -> str:
    """The source of ``path``, or of its nearest parent set as a whole (a default filled into a
    list a layer gave comes from that layer)."""
    while path:
        if path in origin:
            return origin[path]
        path = path.rpartition(".")[0]
    return "default"


def explain(config: MukvConfig, layers: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, Any, str]]:
    """``(field path, value, source)`` of every leaf of ``config``, given the layers it was built from."""
    from .specs import json_safe

    _, origin = with_sources(layers)
    return [(path, value, source_of(path, origin))
            for path, value in flatten(json_safe(config.model_dump())).items()]


def new_session_layers(model: Any, policy: Any, user_layers: list[tuple[str, dict[str, Any]]],
                       policy_source: str = "default") -> list[tuple[str, dict[str, Any]]]:
    """The layers of a new session's configuration, lowest first: mukv's defaults, the model's,
    the policy's, then the user's (file, environment, command line)."""
    from .specs import json_safe

    defaults = json_safe(MukvConfig().model_dump())
    fields, label = model_defaults(model)
    pol = policy if policy is not None else "mukv"
    name = pol if isinstance(pol, str) else pol.get("name", "?")
    plabel = f"policy {name}" + ("" if policy_source in ("default", "command line") else f" ({policy_source})")
    return [("default", defaults), (label, fields), (plabel, policy_fields(pol)), *user_layers]
