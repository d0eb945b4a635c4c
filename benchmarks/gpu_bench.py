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
* the LLM prefill's FLOPs per frame (formula in :func:`gpukit.flops.prefill_flops`) and
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
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

import mukv
from mukv.assembly import Piece, assemble
from mukv.blocks import Query
from mukv.config import MukvConfig
from mukv.reference import ReferenceIngestor, ReferenceStore

# the shared parts (gpukit/), also reached through this module by the scripts beside it (``gb.timed``, ...)
from gpukit.flops import prefill_flops, qwen_vision_flops, qwen_window_sizes, vision_flops  # noqa: F401
from gpukit.ingest import bench_ingest, fast_ingest, kernel_kind, profile_prefill, ref_ingest  # noqa: F401
from gpukit.models import build, encode_pool, frame_hw, model_notes, random_frames  # noqa: F401
from gpukit.report import markdown
from gpukit.synthetic import FPS, SyntheticPlugin, SyntheticStore, store_spec, synthetic_reference_store  # noqa: F401
from gpukit.timing import (  # noqa: F401
    DATASHEET_BF16_BY_NAME,
    allocated_gib,
    datasheet_bf16_tflops,
    event_ms,
    free,
    kernel_bench_args,
    measure_ceilings,
    median,
    peak_gib,
    reset_peak,
    sync,
    timed,
    write_result,
)

#: Short names (a name may stand for several presets); any registered preset name works too.
PRESETS = {
    "0.5b": "llava-onevision-qwen2-0.5b-ov",
    "7b": "llava-onevision-qwen2-7b-ov",
    "qwen7b": "qwen2.5-vl-7b",
    "tiny": "tiny-llava-ov,tiny-qwen2.5-vl",
    "tiny-llava": "tiny-llava-ov",
    "tiny-qwen": "tiny-qwen2.5-vl",
}


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
    "synthetic" (:class:`gpukit.synthetic.SyntheticStore`), "disk" and "disk_cold"
    (:func:`disk_session`; the store lives in a temporary folder, removed at the end).
    Rows are added to ``out`` as they are measured (``on_progress`` is called after each).
    """
    import shutil
    import tempfile

    from mukv.session import Session

    dev = adapter.device
    out = {} if out is None else out
    plugin = SyntheticPlugin()
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
