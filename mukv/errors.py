"""Errors raised by mukv.

Every error a user can trigger derives from :class:`MukvError`, so an
application can catch one type. Each message names the offending value and,
where there is a fixed set of valid choices, lists them.
"""

from __future__ import annotations

import math
import numbers


class MukvError(Exception):
    """Base class of every error mukv raises on purpose."""


class ConfigError(MukvError, ValueError):
    """A configuration value is invalid; the message names the field."""


_SINGULAR = {"policies": "policy", "indexes": "index", "extractors": "extractor", "scorers": "scorer",
             "compressors": "compressor", "retrievers": "retriever", "backends": "backend", "models": "model",
             "evictors": "eviction policy", "sources": "frame source",
             "codecs": "KV codec"}


def singular(role: str) -> str:
    """What one component of a registry role is called ("policies" -> "policy")."""
    return _SINGULAR.get(role, role)


class UnknownPluginError(ConfigError, KeyError):
    """A component name is not registered for its role.

    Attributes:
        role: the registry role ("scorers", "retrievers", ...).
        name: the name that was asked for.
        choices: the names registered for that role.
        field: the configuration field that held the name, if any.
    """

    def __init__(self, role: str, name: str, choices: list[str], field: str | None = None):
        self.role, self.name, self.choices, self.field = role, name, sorted(choices), field
        where = f" (config field {field!r})" if field else ""
        listed = ", ".join(self.choices) if self.choices else "none"
        super().__init__(f"unknown {singular(role)} {name!r}{where}; registered {role}: {listed}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


class InputError(MukvError, ValueError):
    """Frames, timestamps, questions or files given to a session are invalid."""


class EmptyMemoryError(MukvError, RuntimeError):
    """A question was asked before any block was stored."""


class RetrievalError(MukvError, ValueError):
    """A retrieval request cannot be served from what is stored."""


class StoreError(MukvError, RuntimeError):
    """A store is missing, damaged, or does not match the session."""


def expect(value: object, types: type | tuple[type, ...], what: str, error: type[MukvError] = InputError) -> None:
    """Raise ``error`` (InputError by default) naming ``what`` unless ``value`` is one of ``types``: for the
    public helpers whose arguments would otherwise fail deep inside with an AttributeError."""
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in (types if isinstance(types, tuple)
                                                                                    else (types,))):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise error(f"{what} must be {names}; got {type(value).__name__}")


def expect_number(value: object, what: str, lo: float = -math.inf, hi: float = math.inf, *,
                  above: float | None = None, unit: str = "", error: type[MukvError] = InputError) -> float:
    """``value`` as a float when it is a finite real number (numpy's too; not a bool) from ``lo`` to ``hi``
    and, with ``above``, greater than it; else ``error`` naming ``what`` (``unit``: e.g. " of seconds")."""
    try:
        ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
              and lo <= value <= hi and (above is None or value > above))
    except OverflowError:  # an int past float's range
        ok = False
    if not ok:
        bounds = (f" from {lo:g} to {hi:g}" if math.isfinite(lo) and math.isfinite(hi) else
                  f" of at least {lo:g}" if math.isfinite(lo) else f" of at most {hi:g}" if math.isfinite(hi) else "")
        bounds += f" above {above:g}" if above is not None else ""
        raise error(f"{what} must be a finite number{unit}{bounds}; got {value!r}"[:240])
    return float(value)
