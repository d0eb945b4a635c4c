"""Loading model checkpoints for adapters: local safetensors only, and the mukv configuration a
checkpoint was trained with (``mukv_config.json``)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

def load_checkpoint(path, model_cls, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                    ) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load a local checkpoint directory with a transformers model class, for model adapters:
    safetensors only (never pickle), nothing downloaded; ``dtype`` defaults to bf16 on CUDA and
    float32 otherwise. Returns the model on ``device``, its tokenizer and the checkpoint's
    ``preprocessor_config.json`` as a dict (empty when it has none)."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from .errors import StoreError

    path = Path(path)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not any(path.glob("*.safetensors")):
        raise StoreError(f"{path}: no .safetensors weights found (mukv loads safetensors only, never pickle)")
    try:
        with _no_hf_progress():  # the library prints no progress bar nobody asked for
            model = model_cls.from_pretrained(str(path), dtype=dtype, use_safetensors=True,
                                              local_files_only=True).to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        pre = path / "preprocessor_config.json"
        processor = json.loads(pre.read_text()) if pre.exists() else {}
    except Exception as exc:  # noqa: BLE001 - transformers' and safetensors' loaders raise any type (a
        # SafetensorError for a garbage or truncated weights file): the files are bad input, named so
        raise checkpoint_error(path, exc) from None
    if not isinstance(processor, dict):
        raise StoreError(f"{pre}: must hold a JSON object; found {type(processor).__name__}")
    return model, tokenizer, processor


def checkpoint_error(path: Any, exc: BaseException) -> Exception:
    """The :class:`~mukv.errors.StoreError` for a checkpoint at ``path`` that a loader refused with ``exc``
    (any type: transformers' and safetensors' loaders raise their own), naming both."""
    from .errors import StoreError

    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    return StoreError(f"{path}: cannot load the checkpoint ({type(exc).__name__}: {first})")


def channel_stats(processor: dict[str, Any], key: str, default: tuple[float, ...], path: Any) -> tuple[float, ...]:
    """``processor[key]`` (a checkpoint's ``image_mean`` or ``image_std``) as three finite numbers, or
    ``default`` where it has none; :class:`~mukv.errors.StoreError` naming the file otherwise (a std
    must also be above 0)."""
    import math

    from .errors import StoreError

    value = processor.get(key, default)
    ok = (isinstance(value, (list, tuple)) and len(value) == 3
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
          and (key != "image_std" or all(v > 0 for v in value)))
    if not ok:
        raise StoreError(f"{path}/preprocessor_config.json: {key} must be three finite numbers"
                         f"{' above 0' if key == 'image_std' else ''} (one per RGB channel); got {value!r}"[:300])
    return tuple(float(v) for v in value)


@contextmanager
def _no_hf_progress() -> Iterator[None]:
    """transformers' "Loading weights" progress bar off while loading (restored after)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


#: File in a checkpoint directory with the mukv configuration the model was trained with.
MODEL_DEFAULTS_FILE = "mukv_config.json"


def read_model_defaults(path) -> dict[str, Any]:
    """The ``config`` object of a checkpoint's ``mukv_config.json`` (empty when there is none):
    mukv configuration fields the model was trained with, e.g. levels sized for its
    tokens per frame. Validated here, so a bad file is named before anything uses it.

    Raises:
        ConfigError: the file is not JSON, has no ``config`` object, or its fields are invalid.
    """
    import json
    from pathlib import Path

    from .config import MukvConfig
    from .errors import ConfigError

    file = Path(path) / MODEL_DEFAULTS_FILE
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ConfigError(f'{file}: expected a JSON object with a "config" object of mukv configuration fields')
    try:
        MukvConfig.build(data["config"])
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None
    return data["config"]
