"""Building KV codecs: from the session's ``kv_codec`` setting, and from what a store recorded.

A codec is selected by name (``"int4"``) or as ``{"name": "int4", **settings}``
(:attr:`mukv.config.MukvConfig.kv_codec`) and registered by a plugin through
``mukv_register_codecs``. A store records :meth:`KVCodec.record
<mukv.interfaces.KVCodec.record>` per array and builds the codec again from it
with :func:`codec_from_record` to read that array, whatever the session writes with.

"none" (KV stored in the model's dtype as is) is always available, even when
``MUKV_PLUGINS`` leaves the codecs plugin out: every store written before
codecs existed is read with it.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from .errors import ConfigError, StoreError, UnknownPluginError
from .interfaces import KVCodec

NONE = "none"


def _registered(name: str) -> Any | None:
    from .registry import registry

    entry = registry().entries["codecs"].get(name)
    return None if entry is None else entry.component


def _build(name: str, component: Any, settings: dict[str, Any], field: str) -> KVCodec:
    if isinstance(component, type) and issubclass(component, KVCodec):
        try:
            component.Settings.model_validate(settings)
        except ValidationError as exc:
            lines = [f"{'.'.join([field, *map(str, e['loc'])])}: {e['msg']} (got {e.get('input')!r})"
                     for e in exc.errors()]
            raise ConfigError(f"invalid settings of KV codec {name!r}:\n  " + "\n  ".join(lines)) from None
        codec = component(**settings)
    elif isinstance(component, KVCodec):
        if settings:
            raise ConfigError(f"{field}: KV codec {name!r} is registered as a built object and takes no settings; "
                              f"got {sorted(settings)}")
        codec = component
    else:
        raise TypeError(f"registered KV codec {name!r} ({component!r}) is neither a KVCodec subclass nor an instance")
    codec.name = name
    return codec


def build_codec(spec: str | dict[str, Any], field: str = "kv_codec") -> KVCodec:
    """The codec a setting names: ``"int4"`` or ``{"name": "int4", **settings}``.

    Raises:
        UnknownPluginError: no codec of that name is registered (the message lists the registered ones).
        ConfigError: invalid settings (naming the field and the codec).
    """
    if isinstance(spec, str):
        name, settings = spec, {}
    elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
        settings = dict(spec)
        name = settings.pop("name")
    else:
        raise ConfigError(f'{field}: a KV codec is a registered name or {{"name": NAME, **settings}}; got {spec!r}')
    component = _registered(name)
    if component is None:
        if name == NONE:  # always there: it reads every store written before codecs existed
            from mukv.plugins.codecs.none import NoneCodec

            component = NoneCodec
        else:
            from .registry import registry

            raise UnknownPluginError("codecs", name, registry().names("codecs"), field)
    return _build(name, component, settings, field)


def none_codec() -> KVCodec:
    """The "none" codec: KV stored as it is."""
    return build_codec(NONE)


def codec_or_none(codec: Any) -> KVCodec:
    """``codec`` (a backend's ``codec`` argument) checked, or "none" for ``None``.

    Raises:
        ConfigError: not a :class:`~mukv.interfaces.KVCodec`.
    """
    if codec is None:
        return none_codec()
    if not isinstance(codec, KVCodec):
        raise ConfigError(f"codec must be a KVCodec (built from a kv_codec setting); got {type(codec).__name__}")
    return codec


def codec_from_record(record: Any, where: str) -> KVCodec:
    """The codec that reads an array whose store recorded ``record`` (``{"name", "version", "settings"}``).

    Args:
        record: the recorded value (from a file: checked here).
        where: what holds it, for messages (e.g. the array's path).

    Raises:
        StoreError: a malformed record, a codec that is not installed, a layout version newer than the
            installed codec's, or settings it does not accept.
    """
    if not isinstance(record, dict) or not isinstance(record.get("name"), str) \
            or not isinstance(record.get("settings", {}), dict) or isinstance(record.get("version", 1), bool) \
            or not isinstance(record.get("version", 1), int):
        raise StoreError(f"{where}: invalid KV codec record {record!r}")
    name = record["name"]
    try:
        codec = build_codec({"name": name, **record.get("settings", {})}, field=f"{where} codec")
    except UnknownPluginError as exc:
        raise StoreError(f"{where}: stored with KV codec {name!r}, which is not installed (registered: "
                         f"{', '.join(exc.choices) or 'none'}); install the plugin that provides it") from None
    except ConfigError as exc:
        raise StoreError(f"{where}: KV codec {name!r} cannot read its recorded settings ({exc})") from None
    if int(record.get("version", 1)) > int(codec.version):
        raise StoreError(f"{where}: stored with version {record['version']} of KV codec {name!r}; the installed "
                         f"one reads up to version {codec.version} (upgrade the plugin that provides it)")
    return codec


def same_codec(a: KVCodec, b: KVCodec) -> bool:
    """Whether two codecs store the same format (equal records: same name, version and recorded settings), so
    that either reads what the other writes (settings that only change the encoder's choices, such as kivi4's
    ``range_search``, are not recorded)."""
    return a.record() == b.record()
