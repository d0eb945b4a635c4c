"""Logging: everything mukv reports goes to the standard ``logging`` module under the ``mukv``
logger (``mukv.session``, ``mukv.registry``, ``mukv.backends.disk.hot`` ...). The library
prints nothing itself except the progress bars a caller asks for (``progress=True``).

Unconfigured, Python shows warnings and errors on stderr (its last-resort handler), so a
warning such as "this model has random weights" is seen; an application configures the
``mukv`` logger as it likes (``logging.getLogger("mukv").setLevel(logging.INFO)``).
:func:`configure_logging` is what the ``mukv`` command uses for ``-v``, ``-vv``, ``-q`` and
``--log-json``.

What is logged, by level:

* WARNING: a plugin skipped or a name refused (once, when the registry is built), a model
  with random weights, a deprecated configuration field, a question-log record that could not
  be written, a hot-tier level whose blocks cannot fit a slab;
* INFO: each session (stream, model, backend, configuration hash), each answer (time, blocks
  per level, KV tokens);
* DEBUG: each plugin loaded, each question-log record written.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO

from .errors import ConfigError

#: The logger every mukv module logs under.
LOGGER = "mukv"

_LEVELS = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}
#: Attributes of every LogRecord (anything else on a record is an ``extra`` field).
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class TextFormatter(logging.Formatter):
    """``mukv: warning: message`` (``mukv.registry: debug: message`` at debug level)."""

    def __init__(self, names: bool = False):
        super().__init__()
        self.names = names

    def format(self, record: logging.LogRecord) -> str:
        where = record.name if self.names else "mukv"
        text = f"{where}: {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
    and any ``extra`` fields of the record."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


_installed: list[tuple[logging.Handler, int, bool]] = []  # handler, the level and propagate it replaced


def configure_logging(verbosity: int = 0, json_lines: bool = False, stream: IO[str] | None = None) -> logging.Handler:
    """Send the ``mukv`` logger's records to ``stream`` (stderr) at a verbosity: -1 errors only
    (``-q``), 0 warnings (the default), 1 info (``-v``), 2 or more debug (``-vv``); as text, or
    as JSON lines. :func:`restore_logging` undoes it. Returns the handler."""
    logger = logging.getLogger(LOGGER)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter(names=verbosity >= 2))
    _installed.append((handler, logger.level, logger.propagate))
    logger.addHandler(handler)
    logger.setLevel(_LEVELS.get(verbosity, logging.DEBUG if verbosity > 1 else logging.ERROR))
    logger.propagate = False
    return handler


def restore_logging(handler: logging.Handler) -> None:
    """Remove a handler :func:`configure_logging` installed and restore the logger's level and
    propagation as they were before it."""
    if not isinstance(handler, logging.Handler):
        raise ConfigError(f"restore_logging takes the handler configure_logging returned; got {type(handler).__name__}")
    logger = logging.getLogger(LOGGER)
    for i, (h, level, propagate) in enumerate(_installed):
        if h is handler:
            logger.removeHandler(h)
            logger.setLevel(level)
            logger.propagate = propagate
            del _installed[i]
            break
    handler.close()


def log_error(message: str) -> None:
    """Log the command's final error (``--log-json``: as a JSON line like every other record)."""
    logging.getLogger(LOGGER).error("%s", message)
