"""Where one stream's ingest spends its GPU time (issue 18, part 2): kernels by kind, and the
share of wall time the GPU is busy, for the vision tower and for the prefill of every level.

    python benchmarks/profile_ingest.py --device cuda --out runs/profile [--accel fused_vision,fused_llm]

Random-weight real architecture (``--preset``, default llava-onevision-qwen2-0.5b-ov).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench as gb  # noqa: E402

from mukv.accel import accelerate  # noqa: E402
from mukv.config import MukvConfig  # noqa: E402


def profiled(fn, device: torch.device, tag: str, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn()
    gb.sync(device)
    t0 = time.perf_counter()
    fn()
    gb.sync(device)
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        gb.sync(device)
    kinds: dict[str, float] = {}
    rows = []
    syncs = {e.key: e.count for e in prof.key_averages()
             if e.key in ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0.0) or 0.0
        if not t or getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        k = gb.kernel_kind(e.key)
        kinds[k] = kinds.get(k, 0.0) + t
        rows.append((t, k, e.count, e.key[:100]))
    rows.sort(reverse=True)
    total = sum(kinds.values())
    busy = 100 * total / 1e3 / (wall * 1e3)
    print(f"\n{tag}: wall {wall * 1e3:.1f} ms, kernels {total / 1e3:.1f} ms (GPU busy {busy:.0f}%); host waits "
          f"(scalar reads, synchronisations): {syncs}")
    for k, v in sorted(kinds.items(), key=lambda x: -x[1]):
        print(f"  {k:18s} {100 * v / total:5.1f}%  {v / 1e3:8.2f} ms")
    for t, k, c, n in rows[:top]:
        print(f"  {t / 1e3:8.2f} ms x{c:<5d} {k:16s} {n}")
    return {"wall_ms": wall * 1e3, "kernel_ms": total / 1e3, "host_waits": syncs, "kinds_ms": {k: v / 1e3 for k, v in kinds.items()},
            "top": [{"ms": t / 1e3, "kind": k, "count": c, "name": n} for t, k, c, n in rows[:top]]}


def sync_sites(fn, top: int) -> dict:
    """Where ``fn`` makes the host wait for the GPU: CUDA's sync debug mode warns at each wait, and
    each warning's innermost frames in mukv, its plugins and backends and transformers are counted."""
    import traceback
    import warnings

    roots = ("/mukv/", "/plugins/", "/backends/", "/transformers/")
    sites: dict[str, int] = {}

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' hook
        frames = [f for f in traceback.extract_stack()[:-1] if any(r in f.filename for r in roots)][-3:]
        key = " <- ".join(f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
                          for f in reversed(frames)) or "(outside mukv)"
        sites[key] = sites.get(key, 0) + 1

    with warnings.catch_warnings():  # restores the filters and the hook on leaving
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ranked = sorted(sites.items(), key=lambda x: -x[1])
    print(f"\nhost waits by call site ({sum(sites.values())} in all):")
    for k, v in ranked[:top]:
        print(f"  {v:5d}  {k}")
    return dict(ranked[:top])


def batch_parts(adapter, config: MukvConfig, n: int, device: torch.device, top: int) -> dict:
    """One :class:`~mukv.batching.BatchIngest` batch of ``n`` streams with one frame each, against
    one stream's batch of ``n`` frames: wall time, kernel time and the batch's stages."""
    from mukv import Session
    from mukv.batching import BatchIngest, FeedItem

    res: dict = {}
    for tag, streams, per in ((f"{n} streams x 1 frame", n, 1), (f"1 stream x {n} frames", 1, n)):
        sessions = [Session(model=adapter, backend="memory", config=config, stream_id=f"p{i}")
                    for i in range(streams)]
        frames = gb.random_frames(adapter, streams * per * 16, seed=3)
        bi = BatchIngest(encode_batch_frames=config.stream.encode_batch_frames)
        step = [0]

        def run() -> None:
            k = step[0]
            step[0] += 1
            items = [FeedItem.of(s, frames[((k % 16) * streams + i) * per:((k % 16) * streams + i + 1) * per])
                     for i, s in enumerate(sessions)]
            bi.run(items)

        for _ in range(4):  # every level's windows completed at least once
            run()
        prof = profiled(run, device, f"batch: {tag}", top)
        bi.stage_times = {}
        for _ in range(8):
            run()
        prof["stages_ms_per_batch"] = {k: 1e3 * v / 8 for k, v in bi.stage_times.items()}
        print("  stages (ms per batch):", json.dumps({k: round(v, 2) for k, v in prof["stages_ms_per_batch"].items()}))
        res[tag] = prof
        for s in sessions:
            s.close()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="llava-onevision-qwen2-0.5b-ov")
    p.add_argument("--frames", type=int, default=64, help="frames per profiled call")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--streams", type=int, default=0,
                   help="also profile one scheduler batch of this many streams, one frame each, against one "
                        "stream's batch of as many frames (0: skip)")
    p.add_argument("--only-streams", action="store_true", help="skip the single-stream parts")
    p.add_argument("--accel", default="", help="accelerations to apply first, comma-separated names of "
                                              "mukv.accel.KNOWN (default: none, the plain path)")
    p.add_argument("--out", type=Path, default=Path("runs/profile"))
    a = p.parse_args(argv)
    device = torch.device(a.device)
    a.out.mkdir(parents=True, exist_ok=True)
    adapter = gb.build(a.preset, device)
    applied = accelerate(adapter, [w for w in a.accel.split(",") if w]) if a.accel else []
    print("accelerations:", applied or "none (plain path)")
    vt = adapter.model.model.vision_tower
    print("vision attention:", getattr(vt.config, "_attn_implementation", None),
          "| text attention:", getattr(adapter.model.config.text_config, "_attn_implementation", None))
    config = MukvConfig()
    pool = gb.random_frames(adapter, a.frames, seed=1)
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    out: dict = {"preset": a.preset, "frames": a.frames, "device": card, "accel": applied}
    if a.streams:
        out["batch"] = batch_parts(adapter, config, a.streams, device, a.top)
    if a.only_streams:
        (a.out / "profile.json").write_text(json.dumps(out, indent=1))
        return 0
    out["preprocess"] = profiled(lambda: adapter.preprocess(pool), device, "preprocess", a.top)
    pixels = adapter.preprocess(pool)
    out["vision"] = profiled(lambda: adapter.encode_frames(pool), device, "encode_frames", a.top)
    with torch.inference_mode():
        out["tower"] = profiled(lambda: vt(pixels, output_hidden_states=True), device, "vision tower only", a.top)
    embeds = gb.encode_pool(adapter, pool, config.stream.encode_batch_frames)
    def ingest():
        gb.fast_ingest(adapter, config, embeds, None, 4 * a.frames, a.frames)
    tag = f"ingest without vision ({4 * a.frames} frames, chunks of {a.frames})"
    out["ingest"] = profiled(ingest, device, tag, a.top)
    if device.type == "cuda":
        out["ingest_sync_sites"] = sync_sites(ingest, a.top)
    st = gb.fast_ingest(adapter, config, embeds, None, 4 * a.frames, a.frames, stages=True)
    print("stages (s):", json.dumps({k: round(v, 4) for k, v in st.get("stages", {}).items()}))
    out["stages"] = st.get("stages")
    (a.out / "profile.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
