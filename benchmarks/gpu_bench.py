"""GPU benchmark: mukv's fast path against the reference mode (the authors' path), side by side.

Real architectures with random weights (exact configs of
llava-onevision-qwen2-0.5b-ov, llava-onevision-qwen2-7b-ov and
Qwen2.5-VL-7B-Instruct), bf16, one process, one GPU::

    python benchmarks/gpu_bench.py --out results/            # full run (0.5b, 7b, qwen7b)
    python benchmarks/gpu_bench.py --out /tmp/b --presets qwen7b --backend lancedb   # one model, plus disk-tier rows
    python benchmarks/gpu_bench.py --out /tmp/b --quick      # smoke run
    python benchmarks/gpu_bench.py --out /tmp/b --device cpu --presets tiny --quick   # CPU check of the script

What it measures, per model:

* ingest throughput (frames/s) without the vision tower (encoded frames in)
  and with it (uint8 frames of the vision tower's input size in), fast path
  and reference mode, and the share of time per stage (encode, prefill,
  score, compress, store);
* the LLM prefill's FLOPs per frame (formula in :func:`prefill_flops`) and
  the share of the GPU's bf16 matrix rate it reaches (measured in the same
  run, and the datasheet's 989 TFLOP/s);
* question latency to the first token, split into query vector, retrieval,
  page-in (assembly included) and prompt prefill + first token, plus the
  end-to-end ``Session.ask`` time to the first token, and the full answer of
  32 tokens; with 1 h, 10 h and 100 h stored (0.5 fps), fast and reference;
* peak GPU memory of each phase;
* with ``--backend lancedb``: the same questions over a real ingest into the
  disk tier (hot tier on the GPU, KV in zarr, index in lancedb), once with the
  default hot tier and once with none (every retrieved block paged in from
  disk through pinned staging buffers).

Both model families run the same code: the LLaVA-OneVision presets with 1D
RoPE, Qwen2.5-VL with its 3D M-RoPE position codes (each frame its own
temporal step, 392 x 392 pixels, 14 x 14 = 196 merged tokens); the reference
mode prefills with the adapter's own position codes, so it serves both.

Stored KV: for the 0.5B model the 1 h store is a real ingest (random frame
embeddings through the fast path); every other store is synthetic (random
bf16 KV blocks and vectors of the right shapes in a benchmark-only backend),
as the results table says row by row. Where the KV of a store does not fit
the GPU, vectors and metadata are held for every block and KV for a pool of
blocks that block ids map onto (``id % pool``), on the GPU or in pinned host
memory (page-in is then a host-to-device copy per block).

Writes ``results.json`` and ``results.md`` under ``--out`` and prints the
table last.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import mukv
from mukv.assembly import Piece, assemble
from mukv.blocks import Query
from mukv.config import MukvConfig
from mukv.interfaces import BlockMeta, Compressor, StorageBackend
from mukv.reference import ReferenceIngestor, ReferenceStore

#: Short names (a name may stand for several presets); any registered preset name works too.
PRESETS = {
    "0.5b": "llava-onevision-qwen2-0.5b-ov",
    "7b": "llava-onevision-qwen2-7b-ov",
    "qwen7b": "qwen2.5-vl-7b",
    "tiny": "tiny-llava-ov,tiny-qwen2.5-vl",
    "tiny-llava": "tiny-llava-ov",
    "tiny-qwen": "tiny-qwen2.5-vl",
}
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}
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
FPS = 0.5  # stream sampling rate: 1 h = 1800 frames
QUESTIONS = [
    "what color was the car?",
    "where did the red square move after the blue circle appeared?",
    "how many objects were in the scene when the yellow star appeared?",
    "what shape was at the top left corner before the green ring moved?",
]
REFERENCE_NOTE = ("The reference mode runs for every model: it prefills each block with the adapter's own "
                  "position codes (1D RoPE for LLaVA-OneVision, 3D M-RoPE for Qwen2.5-VL) and runs the vision "
                  "tower with eager attention, so the speedups of both families are measured side by side.")
#: Stream length (hours) of the disk-tier rows (``--backend lancedb``): a real ingest, so shorter for big models.
DISK_HOURS = {"small": 1.0, "big": 1 / 6}


def expand_presets(names: str) -> list[str]:
    """Preset names from ``--presets`` (short names of :data:`PRESETS` expanded), in order, once each."""
    out: list[str] = []
    for name in names.split(","):
        for preset in PRESETS.get(name.strip(), name.strip()).split(","):
            if preset and preset not in out:
                out.append(preset)
    return out


def short_name(preset: str) -> str:
    """A short tag of a preset for file names ("0.5b-ov", "qwen2.5-vl-7b", ...)."""
    return preset.replace("llava-onevision-qwen2-", "")


# ------------------------------------------------------------------------------------ timing
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


# ------------------------------------------------------------------------------------ ceilings
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


# ------------------------------------------------------------------------------------ FLOPs
def prefill_flops(adapter: Any, config: MukvConfig, prefix_len: int) -> dict[str, float]:
    """FLOPs of the LLM prefill per frame, all levels.

    Per block of L tokens after a system prompt of P tokens, per layer:

    * linear: ``2 * L * (d*Hq*Dh + 2*d*Hk*Dh + Hq*Dh*d + 3*d*F)`` (q, k, v, o
      projections and the gated MLP; biases, norms, RoPE and activations left out);
    * attention: ``4 * Hq * Dh * (L*P + L*(L+1)/2)`` (QK^T and PV over the
      entries the causal mask keeps);

    times Y layers, times blocks per frame (patch 4 of 49 tokens, frame 1 of
    196, segment 1/4 of 784 at MuKV's defaults). The last layer's column-sum
    pass and the unused last-layer output are overhead, not counted as work.
    """
    c = adapter.language_model.config
    d, hq, hk, y, f = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers, \
        c.intermediate_size
    dh = getattr(c, "head_dim", None) or d // hq
    linear = 2 * (d * hq * dh + 2 * d * hk * dh + hq * dh * d + 3 * d * f)
    t = adapter.tokens_per_frame
    total, per_level = 0.0, {}
    for lv in config.levels:
        length = lv.tokens if lv.tokens else lv.frames * t
        blocks_per_frame = (t // lv.tokens if lv.tokens else 1) / lv.frames
        p = prefix_len
        per_block = y * (length * linear + 4 * hq * dh * (length * p + length * (length + 1) / 2))
        per_level[lv.name] = per_block * blocks_per_frame
        total += per_level[lv.name]
    return {"per_frame": total, **{f"per_frame_{k}": v for k, v in per_level.items()},
            "linear_per_token_per_layer": float(linear)}


def vision_flops(adapter: Any) -> float:
    """FLOPs of the vision tower + projector per frame (same conventions as :func:`prefill_flops`).

    LLaVA-OneVision (SigLIP): per layer ``2 n (4 h^2 + 2 h F) + 4 h n^2`` over the
    ``n`` patches of a frame, plus the projector ``2 n (h e + e^2)``. Qwen2.5-VL:
    :func:`qwen_vision_flops`.
    """
    vc = adapter.model.config.vision_config
    if not hasattr(vc, "image_size"):
        return qwen_vision_flops(adapter)
    h, f, layers = vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers
    n = (vc.image_size // vc.patch_size) ** 2
    per_layer = 2 * n * (4 * h * h + 2 * h * f) + 4 * h * n * n
    e = adapter.hidden_size
    projector = 2 * n * (h * e + e * e)
    return float(layers * per_layer + projector)


def qwen_window_sizes(grid: tuple[int, int], merge: int, window: int) -> list[int]:
    """Patches in each attention window of one frame of Qwen2.5-VL's vision tower.

    ``grid``: merged tokens per side ``(gh / m, gw / m)``; windows tile the merged
    grid in squares of ``window`` merged tokens per side (the last ones cut at the
    edge, as ``get_window_index`` does), each merged token ``m * m`` patches.
    """
    gh, gw = grid
    rows = [min(window, gh - i) for i in range(0, gh, window)]
    cols = [min(window, gw - j) for j in range(0, gw, window)]
    return [r * c * merge * merge for r in rows for c in cols]


def qwen_vision_flops(adapter: Any) -> float:
    """FLOPs of Qwen2.5-VL's vision tower + patch merger per frame (one temporal step).

    ``n`` patches of ``C * t * p * p`` inputs, width ``h``, gated MLP of width ``F``:

    * patch embedding (a 3D convolution): ``2 n (C t p^2) h``;
    * per block: ``2 n (4 h^2 + 3 h F)`` (qkv, output projection, gated MLP) plus attention
      ``4 h sum(w_i^2)`` over its windows ``w_i`` (blocks in ``fullatt_block_indexes``
      attend over the whole frame, ``w = n``; the others over windows of
      ``window_size`` pixels, :func:`qwen_window_sizes`);
    * merger, per merged token (``n / m^2``): ``2 (H^2 + H e)`` with ``H = h m^2``.
    """
    vc = adapter.model.config.vision_config
    h, f, depth, p, m = vc.hidden_size, vc.intermediate_size, vc.depth, vc.patch_size, vc.spatial_merge_size
    t = vc.temporal_patch_size
    channels = getattr(vc, "in_channels", None) or getattr(vc, "in_chans", 3)
    gh, gw = adapter.grid  # merged tokens per side
    n = gh * gw * m * m
    windows = qwen_window_sizes((gh, gw), m, max(1, vc.window_size // m // p))
    full = set(vc.fullatt_block_indexes or ())
    attention = sum(4 * h * (n * n if i in full else sum(w * w for w in windows)) for i in range(depth))
    blocks = depth * 2 * n * (4 * h * h + 3 * h * f) + attention
    big = h * m * m
    merger = 2 * (n // (m * m)) * (big * big + big * vc.out_hidden_size)
    return float(2 * n * channels * t * p * p * h + blocks + merger)


def model_notes(adapter: Any, preset: str) -> list[str]:
    """What a reader needs to know about how a model family is fed and counted."""
    vc = adapter.model.config.vision_config
    if hasattr(vc, "image_size"):
        return []
    h, w = frame_hw(adapter)
    m, p = vc.spatial_merge_size, vc.patch_size
    windows = qwen_window_sizes(adapter.grid, m, max(1, vc.window_size // m // p))
    full = len(vc.fullatt_block_indexes or ())
    return [f"{preset}: frames of {h}x{w} pixels, each frame its own temporal step (duplicated in time, as Qwen "
            f"does for a still image): {h // p * (w // p)} patches and {adapter.tokens_per_frame} merged tokens per "
            f"frame; position codes are M-RoPE (t, h, w). Its vision tower attends within {len(windows)} windows "
            f"of at most {max(windows)} patches per frame in {vc.depth - full} of its {vc.depth} blocks and over the "
            f"whole frame in {full}; outside flash-attention-2, transformers runs that as one attention call per "
            f"window (a Python loop), which the vision-tower figures include."]


# ------------------------------------------------------------------------------------ model
def encode_pool(adapter: Any, frames: torch.Tensor, batch: int) -> torch.Tensor:
    """``[n, T, E]`` encoded frames on the device, in the model dtype."""
    return torch.cat([adapter.encode_frames(frames[i : i + batch]) for i in range(0, frames.shape[0], batch)])


def build(preset: str, device: torch.device) -> Any:
    """A registered model preset (random weights) on ``device``: bf16 on CUDA, float32 elsewhere."""
    from mukv.session import load_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return load_model(preset, device, dtype)


def frame_hw(adapter: Any) -> tuple[int, int]:
    """``(height, width)`` of the frames the benchmark feeds: the vision tower's input size
    (LLaVA-OneVision's ``image_size``; Qwen-VL's ``frame_size``), so no resize is timed."""
    size = getattr(adapter, "frame_size", None)
    if size is not None:
        return int(size[0]), int(size[1])
    return int(adapter.image_size), int(adapter.image_size)


def random_frames(adapter: Any, n: int, seed: int) -> torch.Tensor:
    """``uint8 [n, H, W, 3]`` random frames of :func:`frame_hw`'s size (host memory)."""
    h, w = frame_hw(adapter)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=gen)


# ------------------------------------------------------------------------------------ synthetic store
class SyntheticStore(StorageBackend):
    """A benchmark-only backend of random blocks of the right shapes.

    Vectors ``[N, V]`` and metadata of every block live on the device; KV lives
    in a pool of ``pool`` blocks per level (on the device, or in pinned host
    memory), which block ids map onto with ``id % pool``. ``load_kv`` from a
    host pool is one asynchronous host-to-device copy per block.
    """

    name = "bench_synthetic"

    def __init__(self, layout, path=None, device="cpu", spec: dict | None = None, **_: Any):
        self.layout, self.device = layout, torch.device(device)
        self._state: dict[str, Any] = {}
        self.levels: dict[str, dict[str, Any]] = {}
        spec = spec or {}
        gen = torch.Generator(device=self.device).manual_seed(0)
        for name, s in spec["levels"].items():
            n, k, pool, per_window, frames = s["blocks"], s["kept"], s["pool"], s["per_window"], s["frames"]
            v = torch.randn(n, layout.vector_dim, device=self.device, generator=gen)
            window = torch.arange(n, device=self.device) // per_window
            fs = window * frames
            shape = (pool, layout.num_layers, 2, layout.num_kv_heads, k, layout.head_dim)
            if spec.get("kv_on", "device") == "pinned" and self.device.type == "cuda":
                kv = torch.empty(shape, dtype=layout.dtype, pin_memory=True)
                step = max(1, pool // 16)
                for i in range(0, pool, step):
                    kv[i : i + step].copy_(torch.randn((min(step, pool - i), *shape[1:]), device=self.device,
                                                       dtype=layout.dtype, generator=gen))
            else:
                kv = torch.empty(shape, dtype=layout.dtype, device=self.device).normal_(generator=gen)
            self.levels[name] = {
                "n": n, "k": k, "vectors": v, "unit": F.normalize(v, dim=-1), "kv": kv,
                "frame_start": fs, "frame_end": fs + frames,
                "t_start": fs.double() / spec.get("fps", FPS), "t_end": (fs + frames - 1).double() / spec.get("fps", FPS),
            }

    def add(self, blocks):
        raise NotImplementedError("the synthetic store is built whole")

    def count(self, level: str) -> int:
        st = self.levels.get(level)
        return 0 if st is None else st["n"]

    def search(self, level, query, k, within=None):
        st = self.levels[level]
        sims = st["unit"] @ F.normalize(query.to(self.device, torch.float32).reshape(-1), dim=0)
        scores, ids = sims.topk(min(k, st["n"]))
        return ids, scores

    def vectors(self, level, ids):
        return self.levels[level]["vectors"].index_select(0, ids.to(self.device))

    def metadata(self, level, ids):
        st, ids = self.levels[level], ids.to(self.device)
        return BlockMeta(*(st[c].index_select(0, ids) for c in ("frame_start", "frame_end", "t_start", "t_end")))

    def load_kv(self, level, ids):
        st = self.levels[level]
        pool = st["kv"]
        slots = ids.to(pool.device) % pool.shape[0]
        if pool.device == self.device:
            return pool.index_select(0, slots)
        out = torch.empty((slots.numel(), *pool.shape[1:]), dtype=pool.dtype, device=self.device)
        for i, s in enumerate(slots.tolist()):
            out[i].copy_(pool[s], non_blocking=True)
        return out

    def positions(self, level, ids):
        k = self.levels[level]["k"]
        return torch.arange(k, device=self.device).expand(ids.numel(), -1)

    def set_state(self, key, value):
        self._state[key] = value

    def get_state(self, key, default=None):
        return self._state.get(key, default)

    def stats(self):
        tb = self.layout.token_bytes()
        return {n: {"blocks": s["n"], "tokens": s["n"] * s["k"], "bytes": s["n"] * s["k"] * tb}
                for n, s in self.levels.items()}


class _SyntheticPlugin:
    @mukv.hookimpl
    def mukv_register_backends(self, register):
        register("bench_synthetic", SyntheticStore)


def store_spec(adapter: Any, config: MukvConfig, frames: int, kv_on: str, kv_budget_bytes: float) -> dict:
    """Blocks per level for ``frames`` frames at MuKV's defaults, and the KV pool each gets."""
    t = adapter.tokens_per_frame
    tb = adapter.layout.token_bytes()
    levels, total_bytes = {}, 0
    for lv in config.levels:
        length = lv.tokens if lv.tokens else lv.frames * t
        per_window = t // lv.tokens if lv.tokens else 1
        k = Compressor.kept_count(lv, length)
        n = (frames // lv.frames) * per_window
        levels[lv.name] = {"blocks": n, "kept": k, "per_window": per_window, "frames": lv.frames}
        total_bytes += n * k * tb
    for name, s in levels.items():
        full = s["blocks"] * s["kept"] * tb
        share = full / total_bytes if total_bytes else 0
        s["pool"] = int(max(1, min(s["blocks"], (kv_budget_bytes * share) // (s["kept"] * tb))))
    return {"levels": levels, "kv_on": kv_on, "fps": FPS, "kv_bytes_all": total_bytes,
            "kv_bytes_held": sum(s["pool"] * s["kept"] * tb for s in levels.values())}


def synthetic_reference_store(backend: SyntheticStore) -> ReferenceStore:
    """The synthetic store in the authors' layout: per-block host vectors, KV from a host pool."""
    store = ReferenceStore()
    for name, s in backend.levels.items():
        st = store.level(name)
        st.vectors = list(s["vectors"].float().cpu().unbind(0))
        pool = s["kv"][:256].cpu()  # pageable host copy of (at most) 256 blocks, [pool, Y, 2, H, K, D]
        blocks = [[(pool[i, y, 0], pool[i, y, 1]) for y in range(pool.shape[1])] for i in range(pool.shape[0])]
        st.kv = [blocks[i % len(blocks)] for i in range(s["n"])]
    return store


# ------------------------------------------------------------------------------------ ingest
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
    reset_peak(dev)
    sync(dev)
    t0 = time.perf_counter()
    for i in range(0, n, chunk):
        j = min(n, i + chunk)
        if embeds is not None:
            e = embeds[torch.arange(i, j) % embeds.shape[0]]
            s._ingestor.add_frames(e, times[i:j])
        elif stages:
            te, e = timed(lambda: adapter.encode_frames(frames[torch.arange(i, j) % frames.shape[0]]), dev)
            stage_t["encode"] = stage_t.get("encode", 0.0) + te
            s._ingestor.add_frames(e, times[i:j])
        else:
            s.feed(frames[torch.arange(i, j) % frames.shape[0]])
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


# ------------------------------------------------------------------------------------ questions
def staged_ask(s: Any, question: str) -> dict[str, float]:
    """``Session.ask`` step by step with a synchronisation after each stage (same calls)."""
    dev = s.device
    out: dict[str, float] = {}
    plan = s._plan(None, [])
    t, vector = timed(lambda: s.model.query_vector(s.prefix, question), dev)
    out["query"] = t
    query = Query(question, vector, s._last_time or 0.0, s._ingestor.frames_seen)
    t, hits = timed(lambda: s.retriever.retrieve(query, s.backend, plan), dev)
    out["retrieve"] = t

    def page_in():
        pieces = []
        by_level = {h.level: h for h in hits}
        for lp in s.levels:
            h = by_level.get(lp.level.name)
            if h is None or len(h) == 0:
                continue
            pieces.append(Piece(h.level, h.ids, h.scores, s.backend.load_kv(h.level, h.ids),
                                s.backend.metadata(h.level, h.ids)))
        return assemble(s.prefix.kv, pieces, s.config.assembly.order)[0]

    t, context = timed(page_in, dev)
    out["page_in"] = t
    t, gen = timed(lambda: s.model.generate(context, question, 1), dev)
    out["first_token"] = t
    out["ttft_sum"] = out["query"] + out["retrieve"] + out["page_in"] + out["first_token"]
    out["kv_tokens"] = int(context.shape[4])
    return out


def bench_questions(s: Any, ref: ReferenceIngestor | None, reps: int, ref_reps: int, answer_tokens: int,
                    eager_too: bool = False) -> dict:
    dev = s.device
    model = s.model
    for q in QUESTIONS[:2]:  # warm-up (captures the question-time CUDA graphs)
        staged_ask(s, q)
        s.ask(q, max_new_tokens=2)
    stops = model.stop_ids
    model.stop_ids = []
    try:
        s.ask(QUESTIONS[0], max_new_tokens=answer_tokens)
    finally:
        model.stop_ids = stops
    reset_peak(dev)
    staged, e2e, full = [], [], []
    for i in range(reps):
        q = QUESTIONS[i % len(QUESTIONS)]
        staged.append(staged_ask(s, q))
        sync(dev)
        e2e.append(s.ask(q, max_new_tokens=1).timings["total"])
    stops = model.stop_ids
    model.stop_ids = []  # decode the whole budget
    try:
        for i in range(max(2, reps // 2)):
            a = s.ask(QUESTIONS[i % len(QUESTIONS)], max_new_tokens=answer_tokens)
            full.append(a.timings["total"])
    finally:
        model.stop_ids = stops
    res = {k: median([x[k] for x in staged]) for k in staged[0]}
    res["ttft_ask"] = median(e2e)
    res["answer_tokens"] = answer_tokens
    res["full_answer"] = median(full)
    if eager_too:  # the same questions with question-time CUDA graphs off
        model.static_decode = False
        try:
            for q in QUESTIONS[:2]:
                staged_ask(s, q)
            es = [staged_ask(s, QUESTIONS[i % len(QUESTIONS)]) for i in range(reps)]
            model.stop_ids = []
            ef = [s.ask(QUESTIONS[i % len(QUESTIONS)], max_new_tokens=answer_tokens).timings["total"]
                  for i in range(max(2, reps // 2))]
        finally:
            model.static_decode = None
            model.stop_ids = stops
        res["eager_decode"] = {k: median([x[k] for x in es]) for k in ("query", "first_token", "ttft_sum")}
        res["eager_decode"]["full_answer"] = median(ef)
    res["peak_gib"] = peak_gib(dev)
    res["allocated_gib"] = allocated_gib(dev)
    res["blocks"] = {lp.level.name: s.backend.count(lp.level.name) for lp in s.levels}
    if ref is not None and ref_reps > 0:
        ref.ask(QUESTIONS[0], max_new_tokens=1)  # warm-up
        rs = [ref.ask(QUESTIONS[i % len(QUESTIONS)], max_new_tokens=1).timings for i in range(ref_reps)]
        res["ref"] = {k: median([x[k] for x in rs]) for k in ("query", "retrieve", "page_in", "first_token", "total")}
        res["ref"]["ttft"] = res["ref"]["total"]
        rf = [ref.ask(QUESTIONS[i % len(QUESTIONS)], max_new_tokens=answer_tokens, stop=False).timings["total"]
              for i in range(max(1, ref_reps - 1))]
        res["ref"]["full_answer"] = median(rf)
        res["speedup_ttft"] = res["ref"]["ttft"] / res["ttft_ask"]
        res["speedup_full_answer"] = res["ref"]["full_answer"] / res["full_answer"]
    return res


def disk_session(adapter: Any, config: MukvConfig, st: dict, entry: dict, store_dir: Path) -> Any:
    """A session over the disk tier for a row of kind "disk" (a real ingest into a new
    store under ``store_dir``) or "disk_cold" (the last such store reopened with no hot
    tier); describes the store in ``entry``."""
    from mukv.session import Session

    path = store_dir / "bench.mukv"
    if st["kind"] == "disk_cold":
        s = Session.open(path, model=adapter, backend_options={"hot_bytes": 0})
        entry["store"] = ("the store above reopened with no hot tier (hot_bytes=0): every retrieved block read from "
                          "zarr and checked (crc32)" + (", then copied to the GPU through pinned staging buffers"
                                                        if adapter.device.type == "cuda" else "")
                          + " (the files are likely in the OS page cache)")
        return s
    embeds = encode_pool(adapter, random_frames(adapter, 128, seed=2), config.stream.encode_batch_frames)
    options = {} if st.get("hot_bytes") is None else {"hot_bytes": st["hot_bytes"]}
    r = fast_ingest(adapter, config, embeds, None, entry["frames"], config.stream.encode_batch_frames, keep=True,
                    backend="lancedb", path=path, backend_options=options)
    s = r.pop("session")
    tiers = s.backend.tier_stats()
    kv = sum(v["bytes"] for v in s.backend.stats().values() if isinstance(v, dict) and "bytes" in v)
    entry["kv_gib_all"] = kv / 2**30
    entry["hot_budget_gib"] = tiers["hot"]["budget_bytes"] / 2**30
    entry["ingest_fps"] = r["fps"]
    where = "the GPU" if adapter.device.type == "cuda" else "host memory"
    entry["store"] = (f"real: random frames encoded by the vision tower and ingested through the fast path into the "
                      f"lancedb backend ({r['fps']:.0f} frames/s, the offload writer's commits included); KV in zarr "
                      f"and vectors in lancedb on local disk ({kv / 2**30:.1f} GiB of KV), hot tier of "
                      f"{tiers['hot']['budget_bytes'] / 2**30:.2f} GiB on {where} (retrieved blocks are promoted "
                      "into it)")
    return s


def bench_stores(adapter: Any, config: MukvConfig, plan: dict, notes: list[str], out: dict[str, Any] | None = None,
                 on_progress: Callable[[], None] = lambda: None) -> dict:
    """Question latency at each stored length in ``plan["stores"]``.

    Kinds of rows: "real" (a fast-path ingest into the memory backend),
    "synthetic" (:class:`SyntheticStore`), "disk" and "disk_cold"
    (:func:`disk_session`; the store lives in a temporary folder, removed at the end).
    Rows are added to ``out`` as they are measured (``on_progress`` is called after each).
    """
    import shutil
    import tempfile

    from mukv.session import Session

    dev = adapter.device
    out = {} if out is None else out
    plugin = _SyntheticPlugin()
    mukv.register_plugin(plugin, name="bench_synthetic")
    store_dir = Path(tempfile.mkdtemp(prefix="mukv-bench-", dir=plan.get("store_dir")))
    for label, st in plan["stores"].items():
        t0 = time.perf_counter()
        free(dev)
        entry: dict[str, Any] = {"hours": st["hours"], "frames": int(st["hours"] * 3600 * FPS)}
        ref = s = None
        try:
            if st["kind"] in ("disk", "disk_cold"):
                s = disk_session(adapter, config, st, entry, store_dir)
            elif st["kind"] == "real":
                embeds = encode_pool(adapter, random_frames(adapter, 128, seed=2), config.stream.encode_batch_frames)
                r = fast_ingest(adapter, config, embeds, None, entry["frames"], config.stream.encode_batch_frames,
                                keep=True)
                s = r.pop("session")
                del embeds
                entry["store"] = ("real: random frames encoded by the vision tower and ingested through the fast "
                                  f"path ({r['fps']:.0f} frames/s), KV of every block on the GPU (memory backend)")
                if st.get("ref_reps"):
                    ref = ReferenceIngestor.from_session(s, ReferenceStore.from_backend(
                        s.backend, [lp.level.name for lp in s.levels]))
            else:
                spec = store_spec(adapter, config, entry["frames"], st["kv_on"], st["kv_budget_gib"] * 2**30)
                s = Session(model=adapter, backend="bench_synthetic", config=config, backend_options={"spec": spec})
                held = spec["kv_bytes_held"] / spec["kv_bytes_all"]
                where = "GPU" if st["kv_on"] == "device" else "pinned host memory (page-in = host-to-device copies)"
                entry["store"] = (f"synthetic: random vectors and metadata for every block on the GPU; random bf16 "
                                  f"KV for {100 * held:.0f}% of the blocks ({spec['kv_bytes_held'] / 2**30:.1f} of "
                                  f"{spec['kv_bytes_all'] / 2**30:.1f} GiB) in {where}, ids mapped onto them")
                entry["kv_gib_all"] = spec["kv_bytes_all"] / 2**30
                entry["kv_gib_held"] = spec["kv_bytes_held"] / 2**30
                if st.get("ref_reps"):
                    ref = ReferenceIngestor.from_session(s, synthetic_reference_store(s.backend))
            entry.update(bench_questions(s, ref, plan["q_reps"], st.get("ref_reps", 0), plan["answer_tokens"],
                                         eager_too=st.get("eager_too", False)))
            if st["kind"] in ("disk", "disk_cold"):
                entry["tier_stats"] = s.backend.tier_stats()
        except Exception as exc:  # keep the other rows
            entry["error"] = f"{type(exc).__name__}: {exc}"
            notes.append(f"{label}: {entry['error']}")
            traceback.print_exc()
        if s is not None and st["kind"] in ("disk", "disk_cold"):
            try:
                s.close()
            except Exception as exc:  # noqa: BLE001 - reported, the other rows go on
                notes.append(f"{label}: closing the store: {type(exc).__name__}: {exc}")
        entry["wall_s"] = time.perf_counter() - t0
        out[label] = entry
        s = ref = None
        free(dev)
        print(f"  stored {label}: {json.dumps({k: v for k, v in entry.items() if k != 'store'}, default=str)[:400]}",
              flush=True)
        on_progress()
    mukv.unregister_plugin(plugin)
    shutil.rmtree(store_dir, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------ plan
def length_label(hours: float) -> str:
    """``1 h``, ``10 min``, ``128 s`` (stream time at 0.5 fps)."""
    if hours >= 1 and float(hours).is_integer():
        return f"{int(hours)} h"
    if hours * 60 >= 1 and float(round(hours * 60, 6)).is_integer():
        return f"{int(round(hours * 60))} min"
    return f"{int(round(hours * 3600))} s"


def disk_stores(hours: float) -> dict[str, dict[str, Any]]:
    """The two disk-tier rows (``--backend lancedb``): one real ingest of ``hours``, asked with the
    default hot tier, then reopened with none."""
    n = length_label(hours)
    return {f"{n} in lancedb (hot tier)": {"hours": hours, "kind": "disk"},
            f"{n} in lancedb (no hot tier: every block from disk)": {"hours": hours, "kind": "disk_cold"}}


def run_plan(preset: str, device: torch.device, quick: bool, backend: str = "memory") -> dict:
    """Frames, repetitions and stored lengths for a model (``backend`` "lancedb" adds :func:`disk_stores`)."""
    plan = _run_plan(preset, device, quick)
    if backend == "lancedb":
        big = preset.endswith("7b-ov") or preset.endswith("-7b")
        hours = 64 / 1800 if preset.startswith("tiny-") else DISK_HOURS["big" if big else "small"]
        plan["stores"].update(disk_stores(hours))
    return plan


def _run_plan(preset: str, device: torch.device, quick: bool) -> dict:
    big = preset.endswith("7b-ov") or preset.endswith("-7b")
    tiny = preset.startswith("tiny-")
    if tiny:
        return {"sizes": {"fast": 64, "vision": 32, "ref": 8}, "reps": 2, "q_reps": 3, "answer_tokens": 8,
                "stores": {"1 h": {"hours": 64 / 1800, "kind": "real", "ref_reps": 1, "eager_too": True},
                           "100 h": {"hours": 1.0, "kind": "synthetic", "kv_on": "pinned", "kv_budget_gib": 0.05,
                                     "ref_reps": 1}}}
    if quick:
        sizes = {"fast": 64 if big else 256, "vision": 64, "ref": 4}
        return {"sizes": sizes, "reps": 2, "q_reps": 3, "answer_tokens": 32,
                "stores": {"1 h": {"hours": 1, "kind": "synthetic" if big else "real", "kv_on": "device",
                                   "kv_budget_gib": 24, "ref_reps": 1, "eager_too": True},
                           "100 h": {"hours": 100, "kind": "synthetic", "kv_on": "pinned",
                                     "kv_budget_gib": 2, "ref_reps": 0 if big else 1}}}
    sizes = {"fast": 192 if big else 1024, "vision": 128 if big else 512, "ref": 8 if big else 16}
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0
    room = max(4.0, gib - (24 if big else 8))  # what the stored KV may take next to the model
    return {"sizes": sizes, "reps": 3, "q_reps": 10, "answer_tokens": 32,
            "stores": {
                "1 h": {"hours": 1, "kind": "synthetic" if big else "real", "kv_on": "device", "kv_budget_gib": room,
                        "ref_reps": 3, "eager_too": True},
                "10 h": {"hours": 10, "kind": "synthetic", "kv_on": "device", "kv_budget_gib": min(room, 48)},
                "100 h (KV pool on GPU)": {"hours": 100, "kind": "synthetic", "kv_on": "device",
                                           "kv_budget_gib": min(room, 16)},
                "100 h (KV paged in from pinned host)": {"hours": 100, "kind": "synthetic", "kv_on": "pinned",
                                                         "kv_budget_gib": 8, "ref_reps": 0 if big else 2},
            }}


def bench_model(preset: str, device: torch.device, quick: bool, ceilings: dict, notes: list[str],
                out: Path | None = None, backend: str = "memory", store_dir: str | None = None,
                res: dict[str, Any] | None = None, on_progress: Callable[[], None] = lambda: None) -> dict:
    """Every measurement of one model preset (ingest, stage shares, FLOPs, profile, questions), written
    into ``res`` as it is measured (``on_progress`` is called after each part, e.g. to save)."""
    res = {} if res is None else res
    res["preset"] = preset
    t, adapter = timed(lambda: build(preset, device), device)
    res["build_s"] = t
    config = MukvConfig()
    res["weights_gib"] = sum(p.numel() * p.element_size() for p in adapter.model.parameters()) / 2**30
    c = adapter.language_model.config
    res["llm"] = {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "heads": c.num_attention_heads,
                  "kv_heads": c.num_key_value_heads, "intermediate": c.intermediate_size}
    res["kv_bytes_per_token"] = adapter.layout.token_bytes()
    prefix_len = adapter.prefix(config.generation.system_prompt).length
    res["prefix_tokens"] = prefix_len
    res["flops"] = prefill_flops(adapter, config, prefix_len)
    res["flops"]["vision_per_frame"] = vision_flops(adapter)
    plan = run_plan(preset, device, quick, backend)
    plan["store_dir"] = store_dir
    res["plan"] = {k: v for k, v in plan.items()}
    res["model_type"] = adapter.model.config.model_type
    res["frame_hw"] = frame_hw(adapter)
    res["tokens_per_frame"] = adapter.tokens_per_frame
    notes.extend(n for n in model_notes(adapter, preset) if n not in notes)
    print(f"[{preset}] built in {t:.1f} s; weights {res['weights_gib']:.2f} GiB; "
          f"prefill {res['flops']['per_frame'] / 1e9:.1f} GFLOP/frame", flush=True)
    try:
        res["ingest"] = bench_ingest(adapter, config, plan["sizes"], plan["reps"], notes)
        ing = res["ingest"]
        pre = ing["stages_no_vision"].get("prefill")
        if pre:
            achieved = res["flops"]["per_frame"] * plan["sizes"]["fast"] / pre / 1e12
            ing["prefill_tflops"] = achieved
            ing["prefill_share_of_measured_peak"] = achieved / ceilings["bf16_matmul_tflops"] \
                if ceilings.get("bf16_matmul_tflops") else None
        ing["ingest_tflops_no_vision"] = res["flops"]["per_frame"] * ing["fast_no_vision"]["fps"] / 1e12
        print(f"[{preset}] ingest: {json.dumps(ing, default=str)[:900]}", flush=True)
    except Exception as exc:
        res["ingest_error"] = f"{type(exc).__name__}: {exc}"
        notes.append(f"{preset} ingest: {res['ingest_error']}")
        traceback.print_exc()
    free(device)
    if out is not None and device.type == "cuda":
        try:
            res["profile"] = profile_prefill(adapter, config, out, short_name(preset))
        except Exception as exc:
            notes.append(f"{preset} profile: {type(exc).__name__}: {exc}")
        free(device)
    on_progress()
    bench_stores(adapter, config, plan, notes, out=res.setdefault("questions", {}), on_progress=on_progress)
    from mukv import model as mukv_model

    res["question_graphs"] = dict(mukv_model.GRAPHS) or {"ok": True}
    res["lower_right_flash"] = dict(mukv_model._LOWER_RIGHT_OK)
    del adapter
    free(device)
    return res


# ------------------------------------------------------------------------------------ report
def fmt(x: Any, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return str(x)


def ms(x: Any) -> str:
    return "-" if x is None else f"{1e3 * x:,.1f}"


def markdown(results: dict) -> str:
    lines = []
    env = results["environment"]
    lines.append(f"Device: **{env['device']}** ({env.get('memory_gib', 0):.0f} GiB), torch {env['torch']}, "
                 f"transformers {env['transformers']}, Python {env['python']}; run {env['date']}.")
    ce = results.get("ceilings", {})
    if ce:
        lines.append(f"Measured in the same run: bf16 matrix product {fmt(ce.get('bf16_matmul_tflops'), 0)} TFLOP/s "
                     f"(8192^3, random data), device copy {fmt(ce.get('d2d_gbps'), 0)} GB/s, host-to-device "
                     f"{fmt(ce.get('h2d_pinned_gbps'), 0)} GB/s pinned / {fmt(ce.get('h2d_pageable_gbps'), 0)} GB/s "
                     "pageable.")
    lines.append("")
    lines.append("### Ingest (frames per second; bf16; MuKV defaults: 3 levels, 588 prefilled tokens per frame)")
    lines.append("")
    lines.append("| model | vision tower | fast fps | reference fps | speedup | fast peak GiB | reference peak GiB | "
                 "frames timed (fast / ref) |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---|")
    for preset, m in results["models"].items():
        ing = m.get("ingest")
        if not ing:
            lines.append(f"| {preset} | error: {m.get('ingest_error')} | | | | | | |")
            continue
        fh, fw = m.get("frame_hw", (384, 384))
        for key, label in (("no_vision", "no (encoded frames in)"), ("vision", f"yes ({fh}x{fw} frames in)")):
            f_, r_ = ing[f"fast_{key}"], ing[f"ref_{key}"]
            lines.append(f"| {preset} | {label} | {fmt(f_['fps'])} | {fmt(r_['fps'], 2)} | "
                         f"{fmt(ing[f'speedup_{key}'])}x | {fmt(f_['peak_gib'], 2)} | {fmt(r_['peak_gib'], 2)} | "
                         f"{f_['frames']} / {r_['frames']} |")
    lines.append("")
    abl = [(p, m["ingest"]["ablations_fps"]) for p, m in results["models"].items()
           if m.get("ingest") and m["ingest"].get("ablations_fps")]
    if abl:
        lines.append("Ablations (fast path, no vision tower, one run each with one optimisation off):")
        lines.append("")
        lines.append("| model | all on | RMSNorm unfused (transformers' 7 kernels) | masked sdpa + repeated KV heads "
                     "instead of lower-right flash |")
        lines.append("|---|---:|---:|---:|")
        for p, a in abl:
            lines.append(f"| {p} | {fmt(results['models'][p]['ingest']['fast_no_vision']['fps'])} | "
                         f"{fmt(a.get('unfused_rms_norm'))} | {fmt(a.get('masked_attention_repeated_kv'))} |")
        lines.append("")
    lines.append("Share of fast-path ingest time per stage (instrumented run: a synchronisation after each stage):")
    lines.append("")
    lines.append("| model | vision tower | encode | prefill | score | compress + gather | store | other |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for preset, m in results["models"].items():
        ing = m.get("ingest")
        if not ing:
            continue
        for key, label in (("stages_no_vision", "no"), ("stages_vision", "yes")):
            stg = ing[key]
            tot = sum(stg.values()) or 1.0
            cells = [f"{100 * stg.get(k, 0.0) / tot:.1f}%" for k in ("encode", "prefill", "score", "compress",
                                                                       "store", "other")]
            lines.append(f"| {preset} | {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("LLM prefill against the bf16 roofline (FLOPs per frame from `prefill_flops` in the script; "
                 "time = the prefill stage of the instrumented no-vision run):")
    lines.append("")
    lines.append("| model | GFLOP per frame (LLM prefill) | GFLOP per frame (vision) | achieved TFLOP/s | "
                 "% of measured bf16 peak | % of datasheet 989 TFLOP/s | end-to-end TFLOP/s (no vision) |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for preset, m in results["models"].items():
        ing = m.get("ingest") or {}
        fl = m.get("flops")
        if not fl:
            continue
        ach = ing.get("prefill_tflops")
        share = ing.get("prefill_share_of_measured_peak")
        lines.append(f"| {preset} | {fl['per_frame'] / 1e9:,.1f} | {fl['vision_per_frame'] / 1e9:,.1f} | "
                     f"{fmt(ach, 0)} | {fmt(None if share is None else 100 * share, 1)}% | "
                     f"{fmt(None if ach is None else 100 * ach / 989.0, 1)}% | "
                     f"{fmt(ing.get('ingest_tflops_no_vision'), 0)} |")
    lines.append("")
    lines.append("### Questions (milliseconds; medians; time to first token split by stage, each stage ending "
                 "with a synchronisation)")
    lines.append("")
    lines.append("| model | stored | blocks (patch / frame / segment) | KV tokens at answer | query | retrieve | "
                 "page-in | prompt prefill + first token | TTFT (sum) | TTFT (`Session.ask`) | 32-token answer | "
                 "peak GiB | reference TTFT | reference 32-token answer | speedup TTFT / answer |")
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for preset, m in results["models"].items():
        for label, q in m.get("questions", {}).items():
            if "error" in q:
                lines.append(f"| {preset} | {label} | error: {q['error']} |" + " |" * 12)
                continue
            b = q.get("blocks", {})
            ref = q.get("ref", {})
            sp = (f"{fmt(q.get('speedup_ttft'))}x / {fmt(q.get('speedup_full_answer'))}x" if ref else "-")
            lines.append(
                f"| {preset} | {label} | {b.get('patch', 0):,} / {b.get('frame', 0):,} / {b.get('segment', 0):,} | "
                f"{int(q.get('kv_tokens', 0)):,} | {ms(q.get('query'))} | {ms(q.get('retrieve'))} | {ms(q.get('page_in'))} | "
                f"{ms(q.get('first_token'))} | {ms(q.get('ttft_sum'))} | {ms(q.get('ttft_ask'))} | "
                f"{ms(q.get('full_answer'))} | {fmt(q.get('peak_gib'), 2)} | {ms(ref.get('ttft'))} | "
                f"{ms(ref.get('full_answer'))} | {sp} |")
    lines.append("")
    lines.append("The same questions with question-time CUDA graphs off (`HFVideoLLM.static_decode = False`), "
                 "fast path otherwise:")
    lines.append("")
    lines.append("| model | stored | query | prompt prefill + first token | TTFT (sum) | 32-token answer |")
    lines.append("|---|---|---:|---:|---:|---:|")
    for preset, m in results["models"].items():
        for label, q in m.get("questions", {}).items():
            e = q.get("eager_decode")
            if e:
                lines.append(f"| {preset} | {label} | {ms(e.get('query'))} | {ms(e.get('first_token'))} | "
                             f"{ms(e.get('ttft_sum'))} | {ms(e.get('full_answer'))} |")
    lines.append("")
    prof = [(p, m["profile"]) for p, m in results["models"].items() if m.get("profile")]
    if prof:
        lines.append("Kernel time of one 64-frame ingest chunk (profiler), by kind:")
        lines.append("")
        for p, pr in prof:
            parts = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(pr["share"].items(), key=lambda x: -x[1]))
            lines.append(f"- {p}: {pr['total_ms']:.1f} ms; {parts}")
        lines.append("")
    lines.append("What each stored length holds:")
    lines.append("")
    for preset, m in results["models"].items():
        for label, q in m.get("questions", {}).items():
            lines.append(f"- {preset}, {label}: {q.get('store', q.get('error', ''))}")
    lines.append("")
    if results.get("notes"):
        lines.append("Notes:")
        lines.append("")
        for n in results["notes"]:
            lines.append(f"- {n}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for results.json and results.md")
    ap.add_argument("--presets", default="0.5b,7b,qwen7b",
                    help="comma-separated: 0.5b, 7b, qwen7b, tiny (= tiny-llava + tiny-qwen), or preset names")
    ap.add_argument("--quick", action="store_true", help="fewer frames and repetitions (a smoke run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", choices=("memory", "lancedb"), default="memory",
                    help="lancedb: also ask over a real ingest into the disk tier (hot tier, then none)")
    ap.add_argument("--store-dir", default=None, help="where the disk-tier rows' store goes (default: a temporary "
                    "folder in the system's temporary directory, removed afterwards)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu --presets tiny for a check of the script", file=sys.stderr)
        return 2
    import transformers

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0,
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
    }
    results: dict[str, Any] = {"environment": env, "notes": [REFERENCE_NOTE], "models": {}}
    print(f"device: {env['device']}; torch {env['torch']}; transformers {env['transformers']}", flush=True)
    results["ceilings"] = measure_ceilings(device, args.quick)
    print(f"ceilings: {results['ceilings']}", flush=True)

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "results.md").write_text(markdown(results))

    code = 0
    try:
        for preset in expand_presets(args.presets):
            t0 = time.perf_counter()
            entry = results["models"].setdefault(preset, {})
            try:
                bench_model(preset, device, args.quick, results["ceilings"], results["notes"], out,
                            backend=args.backend, store_dir=args.store_dir, res=entry, on_progress=save)
            except Exception as exc:
                traceback.print_exc()
                results["notes"].append(f"{preset}: {type(exc).__name__}: {exc}")
            finally:
                entry["wall_s"] = time.perf_counter() - t0
            free(device)
            save()
    except KeyboardInterrupt:  # e.g. `timeout -s INT`: keep what was measured
        results["notes"].append("interrupted (SIGINT) before the end: the figures are those measured until then")
        code = 130
    save()
    print()
    print(markdown(results))
    return code


if __name__ == "__main__":
    sys.exit(main())
