"""Which levels of different streams may share one prefill forward (a *level kind*).

Two levels batch together when their blocks are made alike: the same model and system prompt, the
same level configuration up to its retrieval fields (``top_k``, ``rerank_weight``), the same token
split, and scorers and compressors that behave alike (:func:`same_component`). Then a block's KV,
scores and kept tokens cannot depend on which of them shared its batch.
:class:`~mukv.batching.BatchIngest` groups each batch's levels by :class:`LevelKinds`.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .pipeline import LevelPipeline


class LevelKind:
    """Levels of several streams whose blocks are made alike: the same model, system prompt,
    level configuration (up to top-k and rerank weight), split, scorer and compressor."""

    def __init__(self, model: Any, prefix: Any, lp: LevelPipeline):
        self.model, self.prefix, self.lp = model, prefix, lp
        self.signature = level_signature(lp)

    def accepts(self, model: Any, prefix: Any, lp: LevelPipeline) -> bool:
        """Whether ``lp`` (of a session over ``model`` with system prompt ``prefix``) is of this kind."""
        mine = self.lp
        return (model is self.model and _same_tensor(prefix.kv, self.prefix.kv) and lp.kept == mine.kept
                and lp.split.shape == mine.split.shape and torch.equal(lp.split.cpu(), mine.split.cpu())
                and level_signature(lp) == self.signature and same_component(lp.scorer, mine.scorer)
                and same_component(lp.compressor, mine.compressor))


class LevelKinds:
    """The level kinds met so far, each found again by an index; a level seen before is looked up
    by identity (its session's ``LevelPipeline``), a new one compared with every kind."""

    def __init__(self) -> None:
        self._kinds: list[LevelKind] = []
        self._kind_of: dict[int, tuple[weakref.ref, int]] = {}  # id(LevelPipeline) -> (ref, index)

    def __getitem__(self, k: int) -> LevelKind:
        return self._kinds[k]

    def __len__(self) -> int:
        return len(self._kinds)

    def index(self, model: Any, prefix: Any, lp: LevelPipeline) -> int:
        """The index of ``lp``'s kind (a new kind where none accepts it)."""
        got = self._kind_of.get(id(lp))
        if got is not None and got[0]() is lp:
            k = got[1]
            if self._kinds[k].model is model:
                return k
        for k, kind in enumerate(self._kinds):
            if kind.accepts(model, prefix, lp):
                break
        else:
            self._kinds.append(LevelKind(model, prefix, lp))
            k = len(self._kinds) - 1
        if len(self._kind_of) > 65536:  # drop entries of levels gone with their sessions
            self._kind_of = {i: e for i, e in self._kind_of.items() if e[0]() is not None}
        self._kind_of[id(lp)] = (weakref.ref(lp), k)
        return k


def level_signature(lp: LevelPipeline) -> Any:
    """What decides how a level's blocks are made, but its name-independent retrieval fields."""
    return lp.level.model_copy(update={"top_k": 0, "rerank_weight": 0.0})


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))


def same_component(a: Any, b: Any, _depth: int = 0) -> bool:
    """Whether two components (scorers, compressors) behave alike: the same object, or objects of one
    class whose attributes are equal (tensors by value, components compared the same way)."""
    if a is b:
        return True
    if type(a) is not type(b) or _depth > 4:
        return False
    da, db = getattr(a, "__dict__", None), getattr(b, "__dict__", None)
    if da is None or db is None or da.keys() != db.keys():
        return False
    for k, va in da.items():
        vb = db[k]
        if isinstance(va, torch.Tensor) or isinstance(vb, torch.Tensor):
            if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and _same_tensor(va, vb)):
                return False
        elif hasattr(va, "__dict__") and not isinstance(va, type) and not callable(va):
            if not same_component(va, vb, _depth + 1):
                return False
        else:
            try:
                if not bool(va == vb):
                    return False
            except Exception:  # noqa: BLE001 - incomparable values: not known to be alike
                return False
    return True
