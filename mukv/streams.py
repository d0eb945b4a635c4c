"""The streams of a store, as units: list, delete, export, import, repair.

    import mukv.streams as ms

    for s in ms.list_streams("/data/cams.mukv"):
        print(s["id"], s["frames"], s["wall_start"], s["bytes"])
    ms.export_stream("/data/cams.mukv", "cam1", "/backup/cam1.mukv")     # a self-contained store
    ms.import_stream("s3://archive/cams", "/backup/cam1.mukv")           # verified, then copied in
    ms.delete_stream("/data/cams.mukv", "cam1")                          # reclaims its disk
    print(ms.repair("/data/cams.mukv").summary())                        # what a repair would do

The same operations as ``mukv streams list|delete|export|import`` and ``mukv repair``. They work on
stores of the disk backend (``"lancedb"``: a local folder or ``s3://``), need no model, and never
change a stream another process is writing (they take its writer lock, or say who holds it).
``backend_options`` takes the same ``storage_options`` as the backend (credentials, endpoint).
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError


def _storage(backend_options: dict[str, Any] | None) -> dict[str, Any] | None:
    if backend_options is None:
        return None
    if not isinstance(backend_options, dict):
        raise ConfigError(f"backend_options must be a dict; got {type(backend_options).__name__}")
    so = backend_options.get("storage_options")
    if so is not None and not isinstance(so, dict):
        raise ConfigError("backend_options.storage_options must be a dict")
    return so


def _path(path: Any, what: str = "path") -> str:
    from .session import check_path

    return check_path(path, what)


def list_streams(path: str, backend_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every stream of a store: ``id``, ``frames``, ``t_start``/``t_end`` (stream seconds),
    ``wall_start``/``wall_end`` (ISO 8601 when the stream keeps wall-clock time), ``bytes`` (KV on
    disk), ``blocks`` per level, ``model``, ``frame_size``, ``sources``, ``gaps``, ``writer`` (pid of a
    process writing it), or ``error`` for a stream whose state cannot be read."""
    from .backends.disk.streams import list_streams as run

    return run(_path(path), _storage(backend_options))


def delete_stream(path: str, stream_id: str, backend_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Delete a stream and reclaim its disk; returns what was removed. An unknown id names the streams
    that exist."""
    from .backends.disk.streams import delete_stream as run

    return run(_path(path), stream_id, _storage(backend_options))


def export_stream(path: str, stream_id: str, dest: str, backend_options: dict[str, Any] | None = None,
                  dest_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy a stream into a new self-contained store at ``dest`` (local or ``s3://``), verified."""
    from .backends.disk.streams import export_stream as run

    return run(_path(path), stream_id, _path(dest, "dest"), _storage(backend_options), _storage(dest_options))


def import_stream(path: str, src: str, stream_id: str | None = None, from_stream: str | None = None,
                  backend_options: dict[str, Any] | None = None, src_options: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Take a stream of store ``src`` (an export) into store ``path`` as ``stream_id`` (default: its
    own id): the source is verified first, the copy after."""
    from .backends.disk.streams import import_stream as run

    return run(_path(path), _path(src, "src"), stream_id, from_stream, _storage(backend_options),
               _storage(src_options))


def repair(path: str, stream_id: str | None = None, apply: bool = False,
           backend_options: dict[str, Any] | None = None):
    """What a repair would do to the store's streams (a :class:`~mukv.backends.disk.repair.RepairPlan`);
    with ``apply=True``, do it. See :mod:`mukv.backends.disk.repair`."""
    from .backends.disk.repair import apply_repair, plan_repair

    if not isinstance(apply, bool):
        raise ConfigError(f"apply must be True or False; got {apply!r}")
    run = apply_repair if apply else plan_repair
    return run(_path(path), stream_id, _storage(backend_options))
