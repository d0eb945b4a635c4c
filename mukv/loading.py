"""What a :class:`~mukv.session.Session` is built from: the model (a preset, a checkpoint, an
adapter), the device and dtype, the backend spec, paths, the question log, and which
configuration fields a stored stream keeps for life. Re-exported by :mod:`mukv.session`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoints import checkpoint_error
from .config import MukvConfig
from .errors import ConfigError, InputError, MukvError, StoreError
from .interfaces import ModelAdapter
from .model import HFVideoLLM
from .registry import registry
from .safeio import read_json_object
from .specs import split, validate_settings

#: The model of ``mukv.Session()`` and of new stores made by the ``mukv`` command.
DEFAULT_MODEL = "mukv-tiny"
#: longest store path or model path accepted
MAX_PATH_CHARS = 4096
#: configuration sections that say how blocks are made and stored: fixed for a stream's life
STORAGE_FIELDS = ("scoring", "compression", "stream")


def default_device() -> torch.device:
    """CUDA if available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_path(path: Any, what: str) -> str:
    """A store or checkpoint path: a non-empty string or ``os.PathLike`` of sane length, no NUL byte."""
    if isinstance(path, Path):
        path = str(path)
    if not isinstance(path, str):
        raise InputError(f"{what} must be a path (str or pathlib.Path); got {type(path).__name__}")
    if not path or len(path) > MAX_PATH_CHARS or "\x00" in path:
        raise InputError(f"{what} must be a non-empty path of at most {MAX_PATH_CHARS} characters without NUL bytes")
    return path


def check_device(device: Any) -> torch.device:
    """A torch device this machine has (``None``: CUDA if available, else CPU)."""
    if device is None:
        return default_device()
    if not isinstance(device, (str, torch.device)) or (isinstance(device, str) and len(device) > 64):
        raise ConfigError(f"device must be a torch device or its name (e.g. 'cpu', 'cuda:0'); got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available on this machine (use 'cpu')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device {device!r}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu", "meta") or dev.type == "meta":
        raise ConfigError(f"device {device!r}: not a device mukv runs on (cpu, cuda, mps)")
    return dev


def check_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    raise ConfigError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16 (or None); got {dtype!r}")


def load_model(model: Any, device: torch.device, dtype: torch.dtype | None = None) -> HFVideoLLM:
    """A model adapter from a registered name (preset), a local checkpoint directory, either
    with settings (``{"name": "llava-onevision-qwen2-0.5b-ov", "parity": "authors"}``), or an adapter.

    Raises:
        ConfigError: unknown preset, no adapter for the checkpoint, invalid settings.
        StoreError: an unreadable checkpoint.
    """
    if isinstance(model, ModelAdapter):
        return model  # type: ignore[return-value]
    if isinstance(model, Path):
        model = str(model)
    if not isinstance(model, (str, Mapping)) or not model:
        raise ConfigError(f"model must be a preset name, a checkpoint directory (either may come with settings: "
                          f'{{"name": ..., setting: value}}) or a ModelAdapter; got {model!r}')
    name, raw, _ = split(model, "model")
    check_path(name, "model")
    dtype = check_dtype(dtype)
    reg = registry()
    path = Path(name)
    if name in reg.entries["models"]:
        entry = reg.entries["models"][name]
        factory = reg.get("models", name)
        if isinstance(factory, type):
            raise ConfigError(f"model {name!r} is an adapter class; pass a checkpoint directory it can load")
        settings = validate_settings("models", name, factory, raw, "model", entry)
        return factory(device=device, dtype=dtype, **_kwargs(settings))
    if path.is_dir():
        cfg = read_json_object(path / "config.json", "checkpoint config.json", 16 << 20, StoreError, missing_ok=True)
        if cfg is None:
            raise StoreError(f"{path}: not a model checkpoint (no config.json)")
        model_type = cfg.get("model_type")
        if not isinstance(model_type, str):
            raise StoreError(f"{path / 'config.json'}: model_type must be a string; got {model_type!r}")
        adapters = {
            t: e for e in reg.entries["models"].values()
            if isinstance(e.component, type) for t in getattr(e.component, "model_types", ())
        }
        if model_type not in adapters:
            raise ConfigError(f"no model adapter for model_type {model_type!r}; adapters exist for {sorted(adapters)}")
        entry = adapters[model_type]
        settings = validate_settings("models", entry.name, entry.component, raw, "model", entry)
        try:
            return entry.component.from_pretrained(path, device=device, dtype=dtype, **_kwargs(settings))
        except MukvError:
            raise
        except Exception as exc:  # noqa: BLE001 - transformers' and safetensors' loaders raise any type
            # (safetensors' SafetensorError for a garbage or truncated weights file, AttributeError for a
            # config of the wrong shape); the checkpoint is bad input, named as such
            raise checkpoint_error(path, exc) from None
    presets = [n for n, e in reg.entries["models"].items() if not isinstance(e.component, type)]
    raise ConfigError(f"unknown model {name!r}: not a registered preset and not a directory; presets: {sorted(presets)}")


def _kwargs(settings: Any) -> dict[str, Any]:
    return {} if settings is None else {k: getattr(settings, k) for k in type(settings).model_fields}


def _model_record(model: Any, adapter: Any) -> Any:
    """What a store records as its model: the name or spec given (JSON), else the adapter's name."""
    if isinstance(model, Path):
        return str(model)
    if isinstance(model, str):
        return model
    if isinstance(model, Mapping):
        return dict(model)
    return adapter.name


def storage_differences(stored: MukvConfig, new: MukvConfig) -> list[str]:
    """The configuration fields of ``new`` that would store blocks differently from ``stored`` (levels
    other than their top-k and rerank weights, scoring, compression, stream)."""
    old_levels = [lv.model_dump(exclude={"top_k", "rerank_weight"}) for lv in stored.levels]
    new_levels = [lv.model_dump(exclude={"top_k", "rerank_weight"}) for lv in new.levels]
    changed = [f for f in STORAGE_FIELDS if getattr(new, f) != getattr(stored, f)]
    return (["levels"] if old_levels != new_levels else []) + changed


def list_stream_ids(backend_cls: Any, path: str, options: dict[str, Any]) -> list[str]:
    """Streams of a store, for messages (empty if it cannot be listed)."""
    fn = getattr(backend_cls, "list_streams", None)
    try:
        return sorted(fn(path, **options)) if callable(fn) else []
    except MukvError:
        return []




def _as_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, MukvConfig):
        return config.model_dump()
    if isinstance(config, dict):
        return config
    raise ConfigError(f"config must be a MukvConfig or a dict, not {type(config).__name__}")




def _backend_spec(backend: Any, options: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
    """``(name, options)`` of a backend given as a name or as ``{"name": ..., **options}``."""
    if isinstance(backend, Mapping):
        name, given, _ = split(backend, "backend")
        clash = sorted(set(given) & set(options or {}))
        if clash:
            raise ConfigError(f"backend options {clash} are given twice (in the backend spec and in backend_options)")
        return name, {**given, **(options or {})} if (given or options) else options
    if not isinstance(backend, str) or not backend:
        raise ConfigError(f"backend must be a registered backend name (or one with options); got {backend!r}")
    return backend, options


def _question_log(where: Any, path: Any, stream_id: str, backend_options: dict[str, Any] | None) -> Any:
    """The session's question log (``None``: off)."""
    if where is False or where is None:
        return None
    from .logs import QuestionLog

    storage = (backend_options or {}).get("storage_options")
    if where is True:
        if path is None:
            raise ConfigError("log_questions=True keeps the log in the store, but this session has no path; "
                              "give the folder or URI to log into instead (log_questions='questions/')")
        return QuestionLog(str(path), stream_id, storage_options=storage)
    if isinstance(where, (str, Path)) and str(where):
        return QuestionLog(str(where), stream_id, storage_options=storage)
    raise ConfigError(f"log_questions must be True, False or a folder / URI; got {where!r}")
