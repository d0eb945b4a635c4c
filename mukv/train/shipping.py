"""The shippable checkpoint of a trained model: :func:`export` writes it,
:func:`load_weights` copies one into a model of the same shape."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import MukvConfig
from .build import config_for


def export(adapter, path: str | Path, card: str | None = None, dtype: torch.dtype = torch.bfloat16,
           config: MukvConfig | None = None) -> Path:
    """Write a shippable checkpoint: ``config.json`` + ``model.safetensors`` in
    ``dtype`` + tokenizer files (``save_pretrained``) + ``MODEL_CARD.md``, and with
    ``config`` a ``mukv_config.json`` holding the levels the model was trained with (default:
    :func:`config_for`), which :class:`mukv.Session` applies when asked for none.
    :meth:`LlavaOnevisionAdapter.from_pretrained` loads it offline (upcast on CPU)."""
    import copy
    import json

    from ..model import MODEL_DEFAULTS_FILE

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(adapter.model).to("cpu", dtype)
    model.save_pretrained(str(path), safe_serialization=True)
    adapter.tokenizer.save_pretrained(str(path))
    levels = (config or config_for(adapter)).model_dump(mode="json")["levels"]
    (path / MODEL_DEFAULTS_FILE).write_text(json.dumps({"config": {"levels": levels}}, indent=1) + "\n")
    if card is not None:
        (path / "MODEL_CARD.md").write_text(card)
    return path


def load_weights(adapter, path: str | Path) -> int:
    """Copy an exported checkpoint's weights (:func:`export`) into ``adapter``'s model of the same
    shape, in its dtype (loaded by transformers, offline, safetensors only). Returns how many tensors
    were copied.

    Raises:
        ValueError: a checkpoint of another shape (missing, unexpected or mis-shaped tensors).
    """
    from mukv.model import load_checkpoint

    loaded, _, _ = load_checkpoint(path, type(adapter.model), "cpu", torch.float32)
    state = loaded.state_dict()
    own = adapter.model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad:
        raise ValueError(f"{path}: not a checkpoint of this shape (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"other shapes {bad[:3]})")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))
    return len(state)


def directory_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
