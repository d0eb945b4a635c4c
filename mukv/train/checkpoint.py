"""Resumable training checkpoints of a :class:`~mukv.train.trainer.Trainer`: float32
weights, bf16 Adam moments and the training-only heads as safetensors shards of at most
:data:`SHARD_BYTES`, plus ``state.json`` (step, config, RNG states, history).
The shippable checkpoint is :func:`mukv.train.shipping.export`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

SHARD_BYTES = 15 * 2**20


def _save_sharded(tensors: dict[str, torch.Tensor], path: Path, stem: str, limit: int = SHARD_BYTES) -> list[Path]:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nbytes
    files = []
    for i, sh in enumerate(shards):
        f = path / f"{stem}-{i:02d}.safetensors"
        save_file(sh, str(f))
        files.append(f)
    return files


def _load_sharded(path: Path, stem: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob(f"{stem}-*.safetensors")):
        out.update(load_file(str(f)))
    if not out:
        raise FileNotFoundError(f"{path}: no {stem}-*.safetensors")
    return out


def save_checkpoint(trainer, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Resumable checkpoint of ``trainer``: float32 weights and bf16 Adam moments as safetensors
    files of at most 15 MB each, plus ``state.json`` (step, config, RNG states, history)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.safetensors"):
        old.unlink()
    weights, seen = {}, set()
    for k, v in trainer.adapter.model.state_dict().items():
        if v.data_ptr() in seen:  # tied (lm_head = embeddings)
            continue
        seen.add(v.data_ptr())
        weights[k] = v.detach().float().cpu().clone().contiguous()
    _save_sharded(weights, path, "weights")
    names = {id(p): n for n, p in trainer.adapter.model.named_parameters()}
    moments: dict[str, dict[str, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
    steps = {}
    for group in trainer.opt.param_groups[:2]:
        for p in group["params"]:
            st = trainer.opt.state.get(p)
            if not st:
                continue
            n = names[id(p)]
            for key in moments:
                moments[key][n] = st[key].detach().to(torch.bfloat16).cpu().contiguous()
            steps[n] = float(st["step"])
    for name, (head, _) in trainer.heads.items():
        names.update({id(p): f"{name}.{n}" for n, p in head.named_parameters()})
    for group in trainer.opt.param_groups[2:]:
        for p in group["params"]:
            st = trainer.opt.state.get(p)
            if st:
                for key in moments:
                    moments[key][names[id(p)]] = st[key].detach().to(torch.bfloat16).cpu().contiguous()
                steps[names[id(p)]] = float(st["step"])
    for key, tensors in moments.items():
        _save_sharded(tensors, path, key)
    aux = {f"{name}.{k}": v for name, (head, _) in trainer.heads.items() for k, v in head.state_dict().items()}
    _save_sharded({k: v.detach().float().cpu().contiguous() for k, v in aux.items()}, path, "aux")
    rng = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state().tolist()
    rng["numpy"] = list(np.random.get_state()[1][:8].tolist())
    state = {"step": trainer.step, "samples": trainer.samples, "train_config": asdict(trainer.cfg), "adam_steps": steps,
             "history": trainer.history, "rng": rng, **(extra or {})}
    (path / "state.json").write_text(json.dumps(state))
    return path


def load_checkpoint(trainer, path: str | Path) -> dict[str, Any]:
    """Restore weights, Adam moments, step and RNG state of ``trainer`` from :func:`save_checkpoint`."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    weights = _load_sharded(path, "weights")
    missing, unexpected = trainer.adapter.model.load_state_dict(
        {k: v.to(trainer.device) for k, v in weights.items()}, strict=False)
    tied = {"lm_head.weight"} if trainer.adapter.model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    moments = {key: _load_sharded(path, key) for key in ("exp_avg", "exp_avg_sq")}
    params = dict(trainer.adapter.model.named_parameters())
    if list(path.glob("aux-*.safetensors")):
        aux = _load_sharded(path, "aux")
        for prefix, head in ((name + ".", head) for name, (head, _) in trainer.heads.items()):
            own = {k[len(prefix):]: v.to(trainer.device) for k, v in aux.items() if k.startswith(prefix)}
            if not any(k.startswith(("aux_head.", "aux_head_lm.")) for k in aux):  # first format: one head
                own = {k: v.to(trainer.device) for k, v in aux.items()} if prefix == "aux_head." else {}
            if own:
                head.load_state_dict(own)
    for name, (head, _) in trainer.heads.items():
        params.update({f"{name}.{n}": p for n, p in head.named_parameters()})
    for n, s in state["adam_steps"].items():
        if n not in params:
            continue
        p = params[n]
        st = trainer.opt.state[p]
        st["step"] = torch.tensor(s, dtype=torch.float32, device=p.device if trainer.device.type == "cuda" else "cpu")
        st["exp_avg"] = moments["exp_avg"][n].to(p.device, torch.float32)
        st["exp_avg_sq"] = moments["exp_avg_sq"][n].to(p.device, torch.float32)
    trainer.step = int(state["step"])
    trainer.samples = int(state.get("samples", trainer.step * state["train_config"]["batch"]))
    trainer.history = state.get("history", [])
    rng = state.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(rng["cuda"], dtype=torch.uint8))
    return state
