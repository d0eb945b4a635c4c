"""Timing, memory and the ceilings a GPU run is compared with."""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

#: Dense bf16 datasheet rates (TFLOP/s) by a piece of the card's name, the first match wins: the PCIe and
#: NVL forms of the H100 run slower than its SXM form (what "H100" alone names).
DATASHEET_BF16_BY_NAME = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                          ("A100", 312.0))


def datasheet_bf16_tflops(card_name: str) -> float | None:
    """The dense bf16 datasheet rate of a card (``torch.cuda.get_device_name``), ``None`` when unknown."""
    for key, tflops in DATASHEET_BF16_BY_NAME:
        if key.lower() in card_name.lower():
            return tflops
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def event_ms(fn: Callable[[], Any], reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` calls, timed by CUDA events (for kernel benchmarks)."""
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def graph_ms(fn: Callable[[], Any], reps: int) -> float:
    """Milliseconds of device time per call of ``fn``: ``reps`` calls recorded once as a CUDA graph and
    replayed between two events, so the host's launch time (which :func:`event_ms` counts for a kernel
    of a few microseconds) is left out, as in the ingest's recorded prefill (``graph_prefill``)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture asks
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()  # once untimed
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    graph.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def kernel_bench_args(name: str, doc: str, argv: list[str] | None, reps: int) -> argparse.Namespace:
    """``--reps`` and ``--out`` of a GPU kernel benchmark; stops with a clear message without CUDA."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--reps", type=int, default=reps)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(f"{name} needs a CUDA GPU")
    return args


def write_result(path: Path | None, res: dict[str, Any]) -> dict[str, Any]:
    """Write a kernel benchmark's ``res`` as JSON to ``path`` (its folder made; nothing when ``None``)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1))
    return res


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def allocated_gib(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def measure_ceilings(device: torch.device, quick: bool) -> dict[str, float]:
    """bf16 matrix rate and copy bandwidths, measured now on this device."""
    out: dict[str, float] = {}
    if device.type != "cuda":
        return out
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    out["bf16_matmul_tflops"] = 2 * n**3 / (event_ms(lambda: a @ b, 5 if quick else 10) / 1e3) / 1e12
    del a, b
    x = torch.empty(2**30 // 2, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    y.copy_(x)
    t, _ = timed(lambda: [y.copy_(x) for _ in range(5)], device)
    out["d2d_gbps"] = 2 * x.numel() * 2 * 5 / t / 1e9
    host_pinned = torch.empty(x.numel(), dtype=x.dtype, pin_memory=True)
    host = torch.empty(x.numel(), dtype=x.dtype)
    x.copy_(host_pinned, non_blocking=True)
    t, _ = timed(lambda: [x.copy_(host_pinned, non_blocking=True) for _ in range(3)], device)
    out["h2d_pinned_gbps"] = x.numel() * 2 * 3 / t / 1e9
    t, _ = timed(lambda: x.copy_(host), device)
    out["h2d_pageable_gbps"] = x.numel() * 2 / t / 1e9
    del x, y, host_pinned, host
    free(device)
    return out

