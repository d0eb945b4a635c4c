"""Ingest throughput of the fast path and of the reference mode (the authors' path), and a kernel
profile of one ingest chunk."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from mukv.config import MukvConfig
from mukv.reference import ReferenceIngestor

from .models import encode_pool, random_frames
from .synthetic import FPS
from .timing import free, median, peak_gib, reset_peak, sync, timed


def fast_ingest(adapter: Any, config: MukvConfig, embeds: torch.Tensor | None, frames: torch.Tensor | None,
                n: int, chunk: int, stages: bool = False, keep: bool = False, backend: str = "memory",
                path: Path | None = None, backend_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Feed ``n`` frames through a fresh session in chunks of ``chunk``.

    ``embeds`` given: encoded frames straight into the ingestor (no vision tower);
    ``frames`` given: uint8 frames through ``Session.feed`` (vision tower included).
    ``backend``: "memory" (default), or "lancedb" with a store ``path``; the
    time then includes waiting for the offload writer to commit every block.
    """
    from mukv.session import Session

    dev = adapter.device
    s = Session(model=adapter, backend=backend, config=config, path=path, backend_options=backend_options or {})
    times = torch.arange(n, dtype=torch.float64) / FPS
    stage_t: dict[str, float] = {}
    if stages:
        s._ingestor.stage_times = stage_t
    # the chunks are made before the clock starts: their gather from the pool (a host copy of every
    # frame, 20-100 ms per 256 frames of 384 x 384) is the benchmark's, not the ingest's
    src = embeds if embeds is not None else frames
    chunks = [(i, min(n, i + chunk), src[torch.arange(i, min(n, i + chunk)) % src.shape[0]])
              for i in range(0, n, chunk)]
    reset_peak(dev)
    sync(dev)
    t0 = time.perf_counter()
    for i, j, part in chunks:
        if embeds is not None:
            s._ingestor.add_frames(part, times[i:j])
        elif stages:
            te, e = timed(lambda: adapter.encode_frames(part), dev)
            stage_t["encode"] = stage_t.get("encode", 0.0) + te
            s._ingestor.add_frames(e, times[i:j])
        else:
            s.feed(part)
    if backend != "memory":
        s.backend.flush()  # every block committed to disk
    sync(dev)
    elapsed = time.perf_counter() - t0
    out = {"frames": n, "seconds": elapsed, "fps": n / elapsed, "peak_gib": peak_gib(dev)}
    if keep:
        out["session"] = s
    if stages:
        out["stages"] = dict(stage_t)
        out["stages"]["other"] = max(0.0, elapsed - sum(stage_t.values()))
    return out


def ref_ingest(adapter: Any, config: MukvConfig, embeds: torch.Tensor | None, frames: torch.Tensor | None,
               n: int) -> dict[str, Any]:
    from mukv.session import Session

    dev = adapter.device
    s = Session(model=adapter, backend="memory", config=config)
    ref = ReferenceIngestor.from_session(s)
    reset_peak(dev)
    if embeds is not None:
        t, _ = timed(lambda: ref.add_frames(embeds[torch.arange(n) % embeds.shape[0]]), dev)
    else:
        t, _ = timed(lambda: ref.feed(frames[torch.arange(n) % frames.shape[0]]), dev)
    return {"frames": n, "seconds": t, "fps": n / t, "peak_gib": peak_gib(dev)}


def bench_ingest(adapter: Any, config: MukvConfig, sizes: dict[str, int], reps: int, notes: list[str]) -> dict:
    dev = adapter.device
    frames = random_frames(adapter, min(sizes["vision"], 128), seed=1)
    # encoded frames (the "no vision tower" input): the vision tower's own output for random frames, cycled
    embeds = encode_pool(adapter, frames, config.stream.encode_batch_frames)
    chunk = config.stream.encode_batch_frames
    res: dict[str, Any] = {"chunk_frames": chunk}

    # warm-up: every kernel and handle of both paths
    fast_ingest(adapter, config, embeds, None, 2 * chunk if dev.type == "cuda" else chunk, chunk)
    fast_ingest(adapter, config, None, frames, chunk, chunk)
    ref_ingest(adapter, config, embeds, None, 4)
    ref_ingest(adapter, config, None, frames, 4)
    free(dev)

    runs = [fast_ingest(adapter, config, embeds, None, sizes["fast"], chunk) for _ in range(reps)]
    res["fast_no_vision"] = {"fps": median([r["fps"] for r in runs]), "fps_runs": [r["fps"] for r in runs],
                             "frames": sizes["fast"], "peak_gib": max(r["peak_gib"] for r in runs)}
    del runs
    free(dev)
    runs = [fast_ingest(adapter, config, None, frames, sizes["vision"], chunk) for _ in range(reps)]
    res["fast_vision"] = {"fps": median([r["fps"] for r in runs]), "fps_runs": [r["fps"] for r in runs],
                          "frames": sizes["vision"], "peak_gib": max(r["peak_gib"] for r in runs)}
    del runs
    free(dev)
    st = fast_ingest(adapter, config, embeds, None, sizes["fast"], chunk, stages=True)
    res["stages_no_vision"] = st["stages"]
    st = fast_ingest(adapter, config, None, frames, sizes["vision"], chunk, stages=True)
    res["stages_vision"] = st["stages"]
    del st
    free(dev)
    runs = [ref_ingest(adapter, config, embeds, None, sizes["ref"]) for _ in range(max(1, reps - 1))]
    res["ref_no_vision"] = {"fps": median([r["fps"] for r in runs]), "fps_runs": [r["fps"] for r in runs],
                            "frames": sizes["ref"], "peak_gib": max(r["peak_gib"] for r in runs)}
    runs = [ref_ingest(adapter, config, None, frames, sizes["ref"]) for _ in range(max(1, reps - 1))]
    res["ref_vision"] = {"fps": median([r["fps"] for r in runs]), "fps_runs": [r["fps"] for r in runs],
                         "frames": sizes["ref"], "peak_gib": max(r["peak_gib"] for r in runs)}
    if dev.type == "cuda":  # ablations: one fast run each with one optimisation switched off
        from mukv import model as mukv_model

        abl = {}
        saved = dict(mukv_model._LOWER_RIGHT_OK)
        try:
            mukv_model.FUSED_NORMS = False
            abl["unfused_rms_norm"] = fast_ingest(adapter, config, embeds, None, sizes["fast"], chunk)["fps"]
            mukv_model.FUSED_NORMS = True
            mukv_model._LOWER_RIGHT_OK[dev.type] = False
            abl["masked_attention_repeated_kv"] = fast_ingest(adapter, config, embeds, None, sizes["fast"], chunk)["fps"]
        finally:
            mukv_model.FUSED_NORMS = True
            mukv_model._LOWER_RIGHT_OK.clear()
            mukv_model._LOWER_RIGHT_OK.update(saved)
        res["ablations_fps"] = abl
        free(dev)
    res["speedup_no_vision"] = res["fast_no_vision"]["fps"] / res["ref_no_vision"]["fps"]
    res["speedup_vision"] = res["fast_vision"]["fps"] / res["ref_vision"]["fps"]
    del embeds, frames
    free(dev)
    return res


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel, by its name: attention, matmul, copy/gather, softmax/reduce or
    elementwise/other."""
    name = name.lower()
    if any(w in name for w in ("flash", "fmha", "attention", "attn")):
        return "attention"
    if any(w in name for w in ("gemm", "cutlass", "xmma", "nvjet", "matmul", "gemv", "cublas")):
        return "matmul"
    if any(w in name for w in ("memcpy", "copy", "gather", "index", "cat")):
        return "copy/gather"
    if "softmax" in name or "reduce" in name:
        return "softmax/reduce"
    return "elementwise/other"


def profile_prefill(adapter: Any, config: MukvConfig, out: Path, tag: str) -> dict[str, Any]:
    """Kernel time of one 64-frame ingest chunk (all three levels), by kind of kernel."""
    from torch.profiler import ProfilerActivity, profile

    from mukv.session import Session

    dev = adapter.device
    chunk = config.stream.encode_batch_frames
    embeds = encode_pool(adapter, random_frames(adapter, chunk, seed=3), chunk)
    s = Session(model=adapter, backend="memory", config=config)
    times = torch.arange(2 * chunk, dtype=torch.float64) / FPS
    s._ingestor.add_frames(embeds, times[:chunk])
    sync(dev)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        s._ingestor.add_frames(embeds, times[chunk:])
        sync(dev)
    kinds: dict[str, float] = {}
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0.0)
        if not t or getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        kind = kernel_kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + t
        rows.append((t, kind, e.key[:110]))
    rows.sort(reverse=True)
    total = sum(kinds.values()) or 1.0
    text = [f"{tag}: kernel time of one {chunk}-frame chunk: {total / 1e3:.2f} ms"]
    text += [f"  {k:18s} {100 * v / total:5.1f}%  {v / 1e3:8.2f} ms" for k, v in sorted(kinds.items(), key=lambda x: -x[1])]
    text += ["  top kernels:"] + [f"  {t / 1e3:8.2f} ms  {k:16s} {n}" for t, k, n in rows[:25]]
    (out / f"profile_{tag}.txt").write_text("\n".join(text) + "\n")
    print("\n".join(text[:8]), flush=True)
    return {"total_ms": total / 1e3, "share": {k: v / total for k, v in kinds.items()}}

