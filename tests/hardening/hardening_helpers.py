"""Helpers of the hardening tests (issue 7): a small, fast configuration, snapshots of what a session
holds, digests of a store's files, and the check of a user-facing error."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: three levels like the paper's (patch 49 tokens of a frame, frame, segment) but small windows and top-k,
#: so a hypothesis example costs milliseconds on the tiny model
FAST = {
    "levels": [
        {"name": "patch", "extractor": "patch_raster", "frames": 1, "tokens": 49, "keep_ratio": 0.1, "top_k": 2,
         "rerank_weight": 0.3},
        {"name": "frame", "extractor": "frame", "frames": 1, "keep_ratio": 0.1, "top_k": 2, "rerank_weight": 0.3},
        {"name": "segment", "extractor": "segment", "frames": 2, "keep_ratio": 0.1, "top_k": 1},
    ],
    "generation": {"max_new_tokens": 2},
    "stream": {"encode_batch_frames": 4},
}
LEVELS = ("patch", "frame", "segment")
SIDE = 16  # frames are SIDE x SIDE pixels (the model resizes them)


def frames(n: int, seed: int = 0, side: int = SIDE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def snapshot(session: Any) -> dict[str, Any]:
    """Everything a session holds, as comparable values: frames, times, and a digest per level of every
    block's KV, vector, positions and metadata."""
    out: dict[str, Any] = {
        "frames": session.stats()["frames"],
        "last_time": session._last_time,
        "frame_hw": session._frame_hw,
        "levels": {},
    }
    b = session.backend
    for lp in session.levels:
        name = lp.level.name
        n = b.count(name)
        h = hashlib.sha256()
        if n:
            ids = torch.arange(n)
            kv = b.load_kv(name, ids)
            h.update(kv.contiguous().view(torch.uint8).numpy().tobytes())
            h.update(b.vectors(name, ids).numpy().tobytes())
            meta = b.metadata(name, ids)
            for col in (meta.frame_start, meta.frame_end, meta.t_start, meta.t_end):
                h.update(col.numpy().tobytes())
        out["levels"][name] = (n, h.hexdigest())
    return out


def tree_digest(root: str | os.PathLike) -> dict[str, tuple[int, int, str]]:
    """``{relative path: (size, mtime_ns, sha256)}`` of every file under ``root`` (to prove nothing was written)."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def assert_clear_error(exc: BaseException) -> None:
    """A user-facing failure: a :class:`mukv.MukvError` whose message says something."""
    import mukv

    assert isinstance(exc, mukv.MukvError), f"{type(exc).__name__} is not a MukvError: {exc!r}"
    msg = str(exc)
    assert len(msg) >= 10 and "Traceback" not in msg, f"unclear message: {msg!r}"
