"""What a result was measured with: code, machine, libraries and model weights.

:func:`provenance` is stored in every ``results.json`` of the harness, so that
two results can be compared (same checkpoint? same code?) and one can be
reproduced: mukv's version and git commit (with whether the work tree had
uncommitted changes), the device, Python, torch and transformers versions, and a
hash of the model's weights.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def git_commit(path: str | Path | None = None) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the git work tree holding ``path``
    (default: the mukv package)."""
    if path is None:
        import mukv

        path = Path(mukv.__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": sha or None, "dirty": bool(status.strip())}


def checkpoint_dir(adapter: Any) -> Path | None:
    """The local checkpoint directory a model adapter was loaded from, if any."""
    model = getattr(adapter, "model", None)
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if name and Path(str(name)).is_dir():
        return Path(str(name))
    return None


def hash_directory(path: str | Path) -> str:
    """sha256 over a checkpoint directory: every regular file's relative name and bytes, in name order."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def hash_weights(module: Any) -> str:
    """sha256 over a model's parameters and buffers (name, dtype, shape, bytes), for models built in code."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_identity(adapter: Any) -> dict[str, Any]:
    """Name, checkpoint directory and hash of a loaded model adapter.

    The hash is the checkpoint directory's (:func:`hash_directory`) when the model came
    from one, else its weights' (:func:`hash_weights`).
    """
    where = checkpoint_dir(adapter)
    if where is not None:
        return {"name": getattr(adapter, "name", None), "checkpoint": str(where),
                "checkpoint_sha256": hash_directory(where), "hash_of": "checkpoint directory"}
    model = getattr(adapter, "model", None)
    digest = hash_weights(model) if model is not None else None
    return {"name": getattr(adapter, "name", None), "checkpoint": None, "checkpoint_sha256": digest,
            "hash_of": "weights in memory"}


def device_description(device: Any) -> str:
    """The device in words: a GPU's name, or the CPU's model and core count."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu: {cpu}, {cores} cores, {torch.get_num_threads()} torch threads"


def provenance(adapter: Any, device: Any, argv: list[str] | None = None) -> dict[str, Any]:
    """Everything needed to reproduce and compare a run (see the module docstring)."""
    import torch
    import transformers

    import mukv

    return {
        "mukv_version": mukv.__version__,
        "git": git_commit(),
        "command": "python -m mukv.bench.evaluate " + " ".join(argv) if argv is not None else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device_description(device),
        "model": model_identity(adapter),
    }
