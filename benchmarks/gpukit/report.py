"""The Markdown report of a ``gpu_bench.py`` run (``results.md``, printed last)."""

from __future__ import annotations

import math
from typing import Any


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
    lines.append("LLM prefill against the bf16 roofline (FLOPs per frame from `prefill_flops` in "
                 "`benchmarks/gpukit/flops.py`; "
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

