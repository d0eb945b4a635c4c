"""Ingest forwards against the bf16 roofline, plain and accelerated (issue 18, part 2).

For each mode (``plain``, and combinations of :data:`mukv.accel.KNOWN`), on a fresh model of
the same random weights (same seed):

* vision tower alone: frames/s of ``encode_frames`` on batches of ``--vision-batch`` frames;
* ingest with the vision tower (``Session.feed`` in chunks of ``--chunk``) and without it
  (encoded frames straight into the ingestor): frames/s and share of the datasheet roofline;
* against ``plain`` on the same frames and questions: the visual tokens' cosine, the kept
  tokens of every level (share of blocks whose kept tokens are equal), the stored KV's
  relative error, the first-token logits (relative L2 error, cosine, top-1 agreement) and
  the greedy answer tokens.

    python benchmarks/accel_bench.py --device cuda --modes plain,compile_vision,fp8_vision,... --out runs/accel

A mode may also name ``static_dims`` or ``dynamic_dims`` (not accelerations): its compiled elementwise
functions fix each tensor's last dimension and keep the others dynamic, or compile every dimension
dynamic (:data:`mukv.fusions.STATIC_LAST_DIM`; default: the library's setting). ``multi_kernel`` (not
an acceleration either) compiles that mode's kernels with inductor's ``triton.multi_kernel``: a
reduction as wide as the vision tower's 1,152-wide layer norms, past inductor's 1,024 limit for
one-pass ("persistent") reductions, is then compiled both ways and the faster one measured is run.

Random-weight real architecture (``--preset``, default llava-onevision-qwen2-0.5b-ov): speed and
agreement are real, answers are not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench as gb  # noqa: E402
from codec_bench import _spy, first_logits  # noqa: E402

import mukv  # noqa: E402
from mukv import fusions  # noqa: E402
from mukv.accel import accelerate  # noqa: E402
from mukv.config import MukvConfig  # noqa: E402

from transformers.models.qwen2 import modeling_qwen2  # noqa: E402

_ORIGINAL_ROTARY = modeling_qwen2.apply_rotary_pos_emb
_DEFAULT_STATIC = fusions.STATIC_LAST_DIM
_DEFAULT_MULTI_KERNEL = __import__("torch._inductor.config", fromlist=["triton"]).triton.multi_kernel
LEVELS = ("patch", "frame", "segment")
QUESTIONS = ("what happened first?", "what colour was the object?", "where did the person go?",
             "how many objects were there?", "what changed at the end?", "what was on the table?")


def _plain_rotary() -> None:
    """transformers' own Qwen2 rotary function back in place: ``fused_llm`` and ``fused_rope`` replace it
    process-wide, so a mode after them would otherwise run theirs."""
    modeling_qwen2.apply_rotary_pos_emb = _ORIGINAL_ROTARY


def run_mode(mode: str, args: argparse.Namespace, device: torch.device, ref: dict[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"mode": mode}
    _plain_rotary()
    t, adapter = gb.timed(lambda: gb.build(args.preset, device), device)
    adapter.stop_ids = []  # every answer decodes its whole budget
    which = [] if mode == "plain" else mode.split("+")
    # "static_dims" and "dynamic_dims" are not accelerations: the compiled helpers of this mode fix each
    # tensor's last dimension, or compile every dimension dynamic (mukv.fusions.STATIC_LAST_DIM; default:
    # the library's); dynamo forgets the other modes' compilations first, so that none fills another's
    # recompile limit
    torch._dynamo.reset()
    fusions.STATIC_LAST_DIM = ("static_dims" in which) or (_DEFAULT_STATIC and "dynamic_dims" not in which)
    import torch._inductor.config as inductor_config

    inductor_config.triton.multi_kernel = 1 if "multi_kernel" in which else _DEFAULT_MULTI_KERNEL
    which = [w for w in which if w not in ("static_dims", "dynamic_dims", "multi_kernel")]
    row["applied"] = accelerate(adapter, which)
    if which:  # how the compiled helpers of the accelerations were compiled
        row["applied"].append("static_dims" if fusions.STATIC_LAST_DIM else "dynamic_dims")
        if inductor_config.triton.multi_kernel:
            row["applied"].append("multi_kernel")
    config = MukvConfig() if args.encode_batch is None else MukvConfig(stream={"encode_batch_frames": args.encode_batch})
    pool = gb.random_frames(adapter, args.vision_batch, seed=1)
    # vision tower alone (the first call compiles)
    t_first, _ = gb.timed(lambda: adapter.encode_frames(pool), device)
    runs = [gb.timed(lambda: adapter.encode_frames(pool), device)[0] for _ in range(args.reps)]
    row["vision"] = {"first_call_s": t_first, "fps": args.vision_batch / gb.median(runs)}
    vis = gb.vision_flops(adapter)
    prefix_len = adapter.prefix(config.generation.system_prompt).length
    fl = gb.prefill_flops(adapter, config, prefix_len)["per_frame"]
    row["vision"]["tflops"] = row["vision"]["fps"] * vis / 1e12
    # ingest, with and without the vision tower (warm-up first: every level's shapes compiled)
    embeds = gb.encode_pool(adapter, pool, config.stream.encode_batch_frames)
    t_warm, _ = gb.timed(lambda: (gb.fast_ingest(adapter, config, embeds, None, args.chunk, args.chunk),
                                  gb.fast_ingest(adapter, config, None, pool, args.chunk, args.chunk)), device)
    row["warm_up_s"] = t_warm
    for key, e, f, n, flops in (("no_vision", embeds, None, args.frames * 2, fl), ("vision", None, pool, args.frames,
                                                                                    fl + vis)):
        fps = [gb.fast_ingest(adapter, config, e, f, n, args.chunk)["fps"] for _ in range(args.reps)]
        r = {"fps": gb.median(fps), "fps_runs": fps, "gflop_per_frame": flops / 1e9}
        r["tflops"] = r["fps"] * flops / 1e12
        if args.peak:
            r["share_of_datasheet"] = r["tflops"] / args.peak
        if args.measured:
            r["share_of_measured"] = r["tflops"] / args.measured
        row["ingest_" + key] = r
        gb.free(device)
    if args.ablate_async_metadata:
        # the same ingest with every batch's frame and time columns copied from pageable memory (each copy
        # waits for the device), as before mukv.blocks.to_device
        from mukv import blocks as mukv_blocks

        mukv_blocks.ASYNC_METADATA = False
        try:
            row["sync_metadata_fps"] = {
                key: gb.median([gb.fast_ingest(adapter, config, e, f, n, args.chunk)["fps"] for _ in range(args.reps)])
                for key, e, f, n in (("no_vision", embeds, None, args.frames * 2), ("vision", None, pool, args.frames))}
        finally:
            mukv_blocks.ASYNC_METADATA = True
        gb.free(device)
    if args.ablate_pinned_frames:
        # the same ingest with the feeds' private copy of their frames in pageable memory, as before
        # mukv.feeding.PIN_FRAMES (the vision tower's input then copied synchronously, at staging speed)
        from mukv import feeding

        feeding.PIN_FRAMES = False
        try:
            row["pageable_frames_fps"] = gb.median([gb.fast_ingest(adapter, config, None, pool, args.frames,
                                                                    args.chunk)["fps"] for _ in range(args.reps)])
        finally:
            feeding.PIN_FRAMES = True
        gb.free(device)
    if args.compare_encode_ahead:
        # the same ingest with each feed's vision batches prefilled one at a time, the next ones encoded on a
        # side stream meanwhile (mukv.encode_ahead, opt-in), alternated with the default order (every batch
        # encoded, then the prefill), so that both see the same machine state
        from mukv import encode_ahead

        default = encode_ahead.ENCODE_AHEAD
        serial, ahead = [], []
        try:
            encode_ahead.ENCODE_AHEAD = True  # warm-up: the pieces' batch shapes compiled and recorded
            gb.fast_ingest(adapter, config, None, pool, args.chunk, args.chunk)
            for _ in range(args.reps):
                encode_ahead.ENCODE_AHEAD = False
                serial.append(gb.fast_ingest(adapter, config, None, pool, args.frames, args.chunk)["fps"])
                encode_ahead.ENCODE_AHEAD = True
                ahead.append(gb.fast_ingest(adapter, config, None, pool, args.frames, args.chunk)["fps"])
        finally:
            encode_ahead.ENCODE_AHEAD = default
        row["encode_ahead_fps"] = {"serial": gb.median(serial), "serial_runs": serial, "ahead": gb.median(ahead),
                                   "ahead_runs": ahead}
        gb.free(device)
    if mode == "plain" and ref is None and args.reference_frames:  # once, in the first plain run
        # the reference mode (the authors' path: every block prefilled alone) on the plain model, same run
        gb.ref_ingest(adapter, config, None, pool, 4)  # warm-up
        row["reference"] = {key: gb.ref_ingest(adapter, config, e, f, args.reference_frames)["fps"]
                            for key, e, f in (("no_vision", embeds, None), ("vision", None, pool))}
        gb.free(device)
    # agreement with the plain path on one stream and its questions
    frames = gb.random_frames(adapter, args.stream_frames, seed=7)
    s = mukv.Session(model=adapter, backend="memory", config=config)
    s.feed(frames)
    seen = _spy(s)
    got: dict[str, Any] = {"visual": adapter.encode_frames(frames[:8]).float().cpu(), "kept": {}, "kv": {},
                           "logits": [], "ids": []}
    for lv in LEVELS:
        n = s.backend.count(lv)
        ids = torch.arange(n, device=s.backend.device if hasattr(s.backend, "device") else "cpu")
        got["kept"][lv] = s.backend.token_index(lv, ids).cpu() if n else None
        got["kv"][lv] = s.backend.load_kv(lv, ids).float().cpu() if n else None
    for q in QUESTIONS[: args.questions]:
        s.ask(q, max_new_tokens=args.answer_tokens)
        got["logits"].append(first_logits(s.model, seen["context"], q, seen["start"]).cpu())
        got["ids"].append(seen["ids"])
    del s.model.generate
    s.close()
    if ref is not None:
        row["agreement"] = compare(ref, got)
    del adapter
    gb.free(device)
    return row, got


def compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    cos = torch.nn.functional.cosine_similarity
    out: dict[str, Any] = {"visual_cosine_min": float(cos(ref["visual"].flatten(1), got["visual"].flatten(1)).min())}
    for lv in LEVELS:
        a, b = ref["kept"][lv], got["kept"][lv]
        if a is None or b is None or a.shape != b.shape:
            out[lv] = {"blocks": None if a is None else int(a.shape[0]), "note": "block counts differ"}
            continue
        same = (a == b).flatten(1).all(dim=1).float().mean().item()
        tok = (a == b).float().mean().item()
        ka, kb = ref["kv"][lv], got["kv"][lv]
        rel = float((ka - kb).norm() / ka.norm())
        out[lv] = {"blocks": int(a.shape[0]), "blocks_same_kept": same, "kept_tokens_same": tok, "kv_rel_l2": rel}
    rl, cs, top = [], [], []
    for la, lb in zip(ref["logits"], got["logits"]):
        rl.append(float((la - lb).norm() / la.norm()))
        cs.append(float(cos(la, lb, dim=0)))
        top.append(int(la.argmax()) == int(lb.argmax()))
    out["logits_rel_l2_median"] = statistics.median(rl) if rl else None
    out["logits_rel_l2_max"] = max(rl) if rl else None
    out["logits_cosine_min"] = min(cs) if cs else None
    out["top1_agreement"] = sum(top) / len(top) if top else None
    agree = [sum(x == y for x, y in zip(a, b)) / max(1, min(len(a), len(b))) for a, b in zip(ref["ids"], got["ids"])]
    out["greedy_agreement"] = statistics.mean(agree) if agree else None
    return out


def markdown(res: dict[str, Any]) -> str:
    f = lambda x, nd=1: "-" if x is None else f"{x:.{nd}f}"  # noqa: E731
    lines = [f"# Ingest forwards, plain and accelerated: {res['preset']} (random weights) on {res['card']}", "",
             f"datasheet bf16 {f(res['peak'], 0)} TFLOP/s, measured bf16 matmul {f(res['measured'], 0)} TFLOP/s; "
             f"chunks of {res['args']['chunk']} frames", "",
             "| mode | vision tower frames/s | ingest w/o vision frames/s (% datasheet) | ingest with vision frames/s "
             "(% datasheet, % measured) | first call s | visual cos min | kept tokens same (patch/frame/segment) | "
             "KV rel. err (segment) | logits rel. L2 (median/max) | top-1 | greedy agree | "
             "x reference (w/o vision / with) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    refs = [r["reference"] for r in res["modes"] if "reference" in r]
    ref = refs[0] if refs else None
    for r in res["modes"]:
        if "error" in r:
            lines.append(f"| {r['mode']} | failed: {r['error'][:120]} |||||||||")
            continue
        a = r.get("agreement", {})
        nv, v = r["ingest_no_vision"], r["ingest_vision"]
        kept = "/".join(f(a.get(lv, {}).get("kept_tokens_same"), 4) for lv in LEVELS) if a else "(reference)"
        lines.append(
            f"| {r['mode']} | {f(r['vision']['fps'])} | {f(nv['fps'])} ({f(100 * nv.get('share_of_datasheet', 0))}%) | "
            f"{f(v['fps'])} ({f(100 * v.get('share_of_datasheet', 0))}%, {f(100 * v.get('share_of_measured', 0))}%) | "
            f"{f(r['vision']['first_call_s'])} | {f(a.get('visual_cosine_min'), 6)} | {kept} | "
            f"{f(a.get('segment', {}).get('kv_rel_l2'), 4)} | {f(a.get('logits_rel_l2_median'), 4)}/"
            f"{f(a.get('logits_rel_l2_max'), 4)} | {f(a.get('top1_agreement'), 2)} | {f(a.get('greedy_agreement'), 2)} | "
            + (f"{f(nv['fps'] / ref['no_vision'])}x / {f(v['fps'] / ref['vision'])}x |" if ref else "- |"))
    ablated = [r for r in res["modes"] if "sync_metadata_fps" in r]
    if ablated:
        lines += ["", "Ingest with the frame and time columns copied from pageable memory (the ablation), frames/s "
                      "without / with the vision tower:"]
        lines += [f"- {r['mode']}: {f(r['sync_metadata_fps']['no_vision'])} / {f(r['sync_metadata_fps']['vision'])} "
                  f"(pinned, asynchronous: {f(r['ingest_no_vision']['fps'])} / {f(r['ingest_vision']['fps'])})"
                  for r in ablated]
    pageable = [r for r in res["modes"] if "pageable_frames_fps" in r]
    if pageable:
        lines += ["", "Ingest with the vision tower, the feeds' frames copied in pageable memory (the ablation of "
                      "mukv.feeding.PIN_FRAMES), frames/s:"]
        lines += [f"- {r['mode']}: {f(r['pageable_frames_fps'])} (pinned: {f(r['ingest_vision']['fps'])})"
                  for r in pageable]
    overlap = [r for r in res["modes"] if "encode_ahead_fps" in r]
    if overlap:
        lines += ["", "Ingest with the vision tower in the default order (every vision batch of a feed encoded, "
                      "then the prefill: serial) against mukv.encode_ahead (each batch prefilled while the next ones "
                      "are encoded on a side stream: ahead), alternated, frames/s (median; runs):"]
        lines += [f"- {r['mode']}: serial {f(r['encode_ahead_fps']['serial'])} "
                  f"({', '.join(f(x) for x in r['encode_ahead_fps']['serial_runs'])}); ahead "
                  f"{f(r['encode_ahead_fps']['ahead'])} ({', '.join(f(x) for x in r['encode_ahead_fps']['ahead_runs'])})"
                  for r in overlap]
    if ref:
        lines += ["", f"Reference mode (the authors' path, plain model, same run): {f(ref['no_vision'], 2)} frames/s "
                      f"without the vision tower, {f(ref['vision'], 2)} with it."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="llava-onevision-qwen2-0.5b-ov")
    p.add_argument("--modes", default="plain,fused_vision,fused_llm,fused_vision+fused_llm,fp8_vision,"
                                      "fp8_vision+fused_llm,fp8_vision+fp8_llm+fused_llm")
    p.add_argument("--vision-batch", type=int, default=64)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--frames", type=int, default=512, help="frames per ingest run (twice that without vision)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--stream-frames", type=int, default=64)
    p.add_argument("--questions", type=int, default=6)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--reference-frames", type=int, default=0,
                   help="frames the reference mode (the authors' path) ingests in the plain mode's run, with and "
                        "without the vision tower, for each mode's speedup over it (0: not measured)")
    p.add_argument("--ablate-async-metadata", action="store_true",
                   help="also measure each mode's ingest with the blocks' frame and time columns copied to the "
                        "GPU from pageable memory (a device wait per copy): what mukv.blocks.to_device saves")
    p.add_argument("--ablate-pinned-frames", action="store_true",
                   help="also measure each mode's ingest with the vision tower with the feeds' frames copied in "
                        "pageable memory: what mukv.feeding.PIN_FRAMES saves")
    p.add_argument("--compare-encode-ahead", action="store_true",
                   help="also measure each mode's ingest with the vision tower with mukv.encode_ahead on and off, "
                        "alternated: what running the next vision batches beside the prefill saves")
    p.add_argument("--encode-batch", type=int, default=None,
                   help="frames per vision batch and feed piece (stream.encode_batch_frames; default: the "
                        "configuration's)")
    p.add_argument("--graph-bucket", type=int, default=None,
                   help="graph_prefill pads batches to a multiple of this many blocks (default: "
                        "mukv.graph_prefill.DEFAULT_BUCKET; 1: no padding, one graph per batch size)")
    p.add_argument("--budget-s", type=float, default=480)
    p.add_argument("--out", default="runs/accel")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.graph_bucket is not None:
        import mukv.graph_prefill

        mukv.graph_prefill.DEFAULT_BUCKET = args.graph_bucket
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = gb.datasheet_bf16_tflops(name) if device.type == "cuda" else None
    args.peak = peak
    args.measured = gb.measure_ceilings(device, quick=True).get("bf16_matmul_tflops") if device.type == "cuda" else None
    res: dict[str, Any] = {"preset": args.preset, "card": name, "peak": peak, "measured": args.measured,
                           "torch": torch.__version__, "args": {k: v for k, v in vars(args).items()}, "modes": [],
                           "skipped": []}
    start = time.perf_counter()
    ref = None
    for mode in args.modes.split(","):
        if time.perf_counter() - start > args.budget_s:
            res["skipped"].append(mode)
            continue
        t0 = time.perf_counter()
        try:
            row, got = run_mode(mode, args, device, ref)
        except Exception as exc:  # noqa: BLE001 - a mode that cannot run is a result, the others go on
            import traceback

            traceback.print_exc()
            row, got = {"mode": mode, "error": f"{type(exc).__name__}: {exc}"}, None
            gb.free(device)
        row["seconds"] = time.perf_counter() - t0
        if mode == "plain" and got is not None:
            ref = got
        res["modes"].append(row)
        print(json.dumps(row, default=str), flush=True)
        (out / "accel.json").write_text(json.dumps(res, indent=1, default=str))
        (out / "accel.md").write_text(markdown(res) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
