"""Helpers of the stream-integrity tests (issue 15): a fast configuration, videos, stores, CLI runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

#: small windows and top-k (as tests/hardening): every feed costs milliseconds on the tiny model
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
SIDE = 16


def frames(n: int, seed: int = 0, side: int = SIDE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def write_mp4(path: Path, n: int, fps: int = 4, side: int = 32, seed: int = 0) -> Path:
    import av

    data = np.random.default_rng(seed).integers(0, 255, (n, side, side, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = side, side, "yuv420p"
        for f in data:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    return path


def state(store: Path, stream: str = "default") -> dict[str, Any]:
    return json.loads((Path(store) / "streams" / f"{stream}.json").read_text())


def mukv_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None, **kw: Any):
    """Run ``python -m mukv ARGS`` in a child process; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "mukv", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "MUKV_MALLOC_ARENA_MAX": "2", **(env or {})}, **kw)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``mukv: error: ...`` line a refused command prints (asserts exit status 2, no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("mukv: warning:")]
    assert len(lines) == 1 and lines[0].startswith("mukv: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]
