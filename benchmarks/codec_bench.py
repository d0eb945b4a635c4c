"""KV codecs: what they cost and what they change in answers (issue 20).

    # on the GPU (the real 0.5B architecture, random weights): every part
    python benchmarks/codec_bench.py --device cuda --preset llava-onevision-qwen2-0.5b-ov --out runs/codecs
    # on the CPU meanwhile: a model small enough for two cores (mukv-tiny is trained: its KV looks learnt)
    python benchmarks/codec_bench.py --device cpu --preset mukv-tiny --parts quality,decode
    python benchmarks/codec_bench.py --device cpu --preset llava-onevision-qwen2-0.5b-ov --parts pagein --questions 5

Parts (``--parts``, comma-separated; all by default):

``decode``
    Encode and decode throughput of each codec on the device for one question's selection at the preset's
    KV layout (MuKV's top-k: 20 patch, 32 frame, 12 segment blocks), synthetic KV with outlier channels:
    GB/s of KV (decoded bytes) and of stored bytes, median of ``--repeats``.
``quality``
    First-token logit error and greedy-token agreement against "none", per codec. One memory-backend session
    of the preset is fed ``--minutes`` of a benchmark stream (mukv.bench, seed ``--seed``); every question
    is then answered from the same retrieved blocks (codecs do not touch the block vectors, so retrieval is
    the same), their KV passed through each codec (what a backend with that codec returns: encode then
    decode). Reported: relative L2 error and max |error| of the first token's logits, cosine, first-token
    agreement, and greedy agreement (the share of the ``--new-tokens`` answer tokens equal to "none"'s at
    the same position, up to the shorter answer, and whole answers equal); and the relative L2 error of the
    keys and of the values paged in for those answers, per level.
``pagein``
    Page-in and time to first token with every block read from disk, per codec: a ``lancedb`` store per
    codec (hot tier off, no promotion) holding ``--store-minutes`` of synthetic blocks at the preset's real
    layout and levels (written through the backend, so stored as each codec stores them), then
    ``--questions`` questions, the store's KV files dropped from the page cache before each. Reported:
    stored and decoded MB per question, page-in ms (``load_kv`` of the question's blocks, device
    synchronised) and GB/s of stored and of decoded bytes, time to first token (query, retrieval, page-in,
    prefill of the answer prompt, first token).

Writes ``codecs.json`` and ``codecs.md`` to ``--out`` (if given) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_week import drop_cache  # noqa: E402

DEFAULT_CODECS = 'none,int8,int4,kivi4,{"name":"kivi4","key_bits":6},fp8'
#: MuKV's final top-k per level (the selection one question pages in)
TOP_K = {"patch": 20, "frame": 32, "segment": 12}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_kv(n: int, block_shape: tuple[int, ...], dtype: torch.dtype, device, seed: int = 0) -> torch.Tensor:
    """``[n, Y, 2, H, K, D]`` KV that quantisers find hard: Gaussian, two key channels of 20x, one value token of
    10x per block."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    kv = torch.randn(n, *block_shape, generator=g)
    kv[:, :, 0, :, :, 3] *= 20.0
    kv[:, :, 0, :, :, block_shape[-1] // 2 + 1] *= 20.0
    kv[:, :, 1, :, 0, :] *= 10.0
    return kv.to(device=device, dtype=dtype)


def codec_list(text: str) -> list[Any]:
    """``none,int8,{"name":"int4","group_size":32}`` -> names and dicts (fp8 dropped where torch lacks it)."""
    out: list[Any] = []
    for part in _split(text):
        spec = json.loads(part) if part.startswith("{") else part
        if spec == "fp8" and not hasattr(torch, "float8_e4m3fn"):
            print("fp8: this torch has no float8_e4m3fn; skipped", flush=True)
            continue
        out.append(spec)
    return out


def _split(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def label(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    rest = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"{spec['name']}({rest})"


# ------------------------------------------------------------------------------ decode
def part_decode(adapter, session, codecs, device, repeats: int) -> dict[str, Any]:
    from mukv.kvcodec import build_codec

    lay = adapter.layout
    out = {}
    for spec in codecs:
        codec = build_codec(spec)
        enc_s, dec_s, stored, decoded = [], [], 0, 0
        for lp in session.levels:
            shape = (lay.num_layers, 2, lay.num_kv_heads, lp.kept, lay.head_dim)
            kv = synthetic_kv(TOP_K.get(lp.level.name, lp.level.top_k), shape, lay.dtype, device)
            enc = codec.encode_blocks(kv)
            codec.decode_blocks(enc, device)  # warm
            sync(device)
            te, td = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                enc = codec.encode_blocks(kv)
                sync(device)
                t1 = time.perf_counter()
                codec.decode_blocks(enc, device)
                sync(device)
                te.append(t1 - t0)
                td.append(time.perf_counter() - t1)
            enc_s.append(statistics.median(te))
            dec_s.append(statistics.median(td))
            stored += enc.nbytes
            decoded += kv.numel() * kv.element_size()
        out[label(spec)] = {"stored_mb": stored / 1e6, "decoded_mb": decoded / 1e6, "encode_ms": 1e3 * sum(enc_s),
                            "decode_ms": 1e3 * sum(dec_s), "decode_gbps_kv": decoded / sum(dec_s) / 1e9,
                            "decode_gbps_stored": stored / sum(dec_s) / 1e9,
                            "encode_gbps_kv": decoded / sum(enc_s) / 1e9}
        r = out[label(spec)]
        print(f"decode {label(spec):24s} {r['stored_mb']:8.2f} MB stored of {r['decoded_mb']:.2f} MB KV; encode "
              f"{r['encode_ms']:.2f} ms, decode {r['decode_ms']:.2f} ms = {r['decode_gbps_kv']:.1f} GB/s of KV",
              flush=True)
    return out


# ------------------------------------------------------------------------------ quality
class CodecView:
    """A backend that returns another backend's KV through a codec's round trip (what a backend storing that
    codec's rows returns); everything else is the other backend's."""

    def __init__(self, base, codec):
        self._base, self._codec = base, codec
        #: per level: squared error and squared norm of keys and of values paged in (KV reconstruction error)
        self.sums: dict[str, list[float]] = {}

    def __getattr__(self, name):
        return getattr(self._base, name)

    def load_kv(self, level, ids):
        kv = self._base.load_kv(level, ids)
        out = self._codec.decode_blocks(self._codec.encode_blocks(kv), kv.device)
        acc = self.sums.setdefault(str(level), [0.0] * 4)
        for i in (0, 1):  # keys, values: [n, Y, 2, H, K, D]
            acc[2 * i] += float((out[:, :, i].float() - kv[:, :, i].float()).square().sum())
            acc[2 * i + 1] += float(kv[:, :, i].float().square().sum())
        return out

    def kv_error(self) -> dict[str, dict[str, float]]:
        """Relative L2 error of the keys and of the values paged in, per level."""
        return {lv: {"key_rel_l2": (a[0] / max(a[1], 1e-30)) ** 0.5, "value_rel_l2": (a[2] / max(a[3], 1e-30)) ** 0.5}
                for lv, a in self.sums.items()}


def _spy(session) -> dict[str, Any]:
    """Capture what ``session.ask`` hands to the model's ``generate``."""
    seen: dict[str, Any] = {}
    orig = type(session.model).generate

    def generate(context, question, max_new_tokens, start_position=None):
        seen["context"], seen["start"] = context.clone(), start_position
        text, ids, timings = orig(session.model, context, question, max_new_tokens, start_position)
        seen["ids"] = list(ids)
        return text, ids, timings

    session.model.generate = generate
    return seen


@torch.no_grad()
def first_logits(model, context: torch.Tensor, question: str, start: int | None) -> torch.Tensor:
    """``[vocab]`` float32 logits of the first answer token over an assembled context (the model's own path)."""
    from mukv.model import _Causal, kv_to_cache

    ids = model.tokenize(model.answer_template.format(question=question))
    cache = kv_to_cache(context, extra=ids.numel())
    pos = context.shape[4] if start is None else start
    positions = torch.arange(pos, pos + ids.numel(), device=model.device)[None]
    with _Causal():
        hidden = model.language_model(input_ids=ids[None], past_key_values=cache, position_ids=positions,
                                      use_cache=True).last_hidden_state[:, -1]
    return model.lm_head(hidden)[0].float()


def part_quality(adapter, codecs, args) -> dict[str, Any]:
    import mukv
    from mukv.bench import Benchmark
    from mukv.kvcodec import build_codec

    bench = Benchmark.generate(seed=args.seed, minutes=args.minutes, fps=0.5, questions=args.questions)
    stream = bench.stream
    s = mukv.Session(model=adapter, backend="memory")
    t0 = time.perf_counter()
    s.feed(stream.frames(0, stream.num_frames), timestamps=stream.timestamps[: stream.num_frames])
    print(f"quality: fed {stream.num_frames} frames in {time.perf_counter() - t0:.1f} s; "
          f"{len(bench.questions)} questions", flush=True)
    results: dict[str, dict[str, list[Any]]] = {}
    refs: list[tuple[torch.Tensor, list[int]]] = []
    kv_errors: dict[str, dict[str, dict[str, float]]] = {}
    for spec in ["none", *[c for c in codecs if c != "none"]]:
        fork = s.fork()
        fork.backend = view = CodecView(s.backend, build_codec(spec))
        seen = _spy(fork)
        rows: dict[str, list[Any]] = {k: [] for k in ("rel_l2", "max_abs", "cosine", "top1", "agree", "same")}
        for qi, q in enumerate(bench.questions):
            fork.ask(q.text, max_new_tokens=args.new_tokens)
            logits = first_logits(fork.model, seen["context"], q.text, seen["start"])
            if spec == "none":
                refs.append((logits, seen["ids"]))
                continue
            ref, ref_ids = refs[qi]
            d = logits - ref
            rows["rel_l2"].append(float(d.norm() / ref.norm()))
            rows["max_abs"].append(float(d.abs().max()))
            rows["cosine"].append(float(torch.nn.functional.cosine_similarity(logits, ref, dim=0)))
            rows["top1"].append(int(logits.argmax()) == int(ref.argmax()))
            n = min(len(ref_ids), len(seen["ids"]))
            rows["agree"].append(sum(a == b for a, b in zip(ref_ids[:n], seen["ids"][:n])) / max(1, n))
            rows["same"].append(ref_ids == seen["ids"])
        del fork.model.generate
        if spec != "none":
            results[label(spec)] = rows
            kv_errors[label(spec)] = view.kv_error()
    s.close()
    out = {}
    for name, rows in results.items():
        out[name] = {"questions": len(rows["rel_l2"]), "rel_l2_median": statistics.median(rows["rel_l2"]),
                     "rel_l2_max": max(rows["rel_l2"]), "max_abs_median": statistics.median(rows["max_abs"]),
                     "cosine_min": min(rows["cosine"]), "top1_agreement": float(np.mean(rows["top1"])),
                     "greedy_agreement": float(np.mean(rows["agree"])), "answers_equal": float(np.mean(rows["same"])),
                     "kv_error": kv_errors[name]}
        r = out[name]
        print(f"quality {name:24s} logits rel L2 {r['rel_l2_median']:.4f} (max {r['rel_l2_max']:.4f}), max|d| "
              f"{r['max_abs_median']:.3f}, cos >= {r['cosine_min']:.5f}; first token {r['top1_agreement']:.1%}, "
              f"greedy {r['greedy_agreement']:.1%}, answers {r['answers_equal']:.1%}; KV rel L2 (keys / values) "
              + ", ".join(f"{lv} {e['key_rel_l2']:.4f} / {e['value_rel_l2']:.4f}" for lv, e in r["kv_error"].items()),
              flush=True)
    return out


# ------------------------------------------------------------------------------ page-in and time to first token
def synthetic_blocks(session, level_pipe, first_window: int, n_windows: int, rng: np.random.Generator):
    from mukv.blocks import CompressedBlocks

    lay = session.model.layout
    lv = level_pipe.level
    per = level_pipe.split.shape[0]  # blocks per window
    b, k = per * n_windows, level_pipe.kept
    kv = synthetic_kv(b, (lay.num_layers, 2, lay.num_kv_heads, k, lay.head_dim), lay.dtype, session.device,
                      seed=int(rng.integers(1 << 30)))  # on the session's device, where ingest encodes
    window = first_window + np.arange(n_windows).repeat(per)  # the blocks of a window share its frames
    fs = torch.from_numpy(np.asarray(window * lv.frames, dtype=np.int64))
    vec = torch.from_numpy(rng.normal(size=(b, lay.vector_dim)).astype(np.float32))
    kept = torch.arange(k).expand(b, k)
    return CompressedBlocks(lv.name, kv, vec, kept, kept + 10, fs, fs + lv.frames, fs.double() * 2,
                            (fs + lv.frames - 1).double() * 2, kept)


def part_pagein(adapter, codecs, args, device) -> dict[str, Any]:
    import mukv

    root = Path(args.path) if args.path else Path(tempfile.mkdtemp(prefix="mukv-codecs-"))
    root.mkdir(parents=True, exist_ok=True)
    qs = [f"what color was the {w} ?" for w in ("car", "ball", "dog", "box", "cup", "hat", "sky", "door", "kite",
                                                "bus", "cat", "bag")]
    qs = (qs * (args.questions // len(qs) + 1))[: args.questions]
    out = {}
    for spec in codecs:
        path = root / f"store-{label(spec)}".replace("(", "_").replace(")", "").replace("=", "").replace(",", "_")
        shutil.rmtree(path, ignore_errors=True)
        s = mukv.Session(model=adapter, backend="lancedb", path=path, config={"kv_codec": spec},
                         backend_options={"hot_bytes": 0, "promote": False, "commit_interval": 5.0})
        rng = np.random.default_rng(0)
        segment = max(lp.level.frames for lp in s.levels)
        windows = max(12, int(args.store_minutes * 60 * 0.5 / segment))
        t0 = time.perf_counter()
        for w0 in range(0, windows, 8):
            nw = min(8, windows - w0)
            for lp in s.levels:
                frames_per_window = segment // lp.level.frames
                s.backend.add(synthetic_blocks(s, lp, w0 * frames_per_window, nw * frames_per_window, rng))
        s.backend.flush()
        t_store = time.perf_counter() - t0
        kv_root = path / "kv"
        disk = sum(p.stat().st_size for p in kv_root.rglob("*") if p.is_file())
        rows = []
        s.ask(qs[0], max_new_tokens=1)  # warm the code paths
        for q in qs:
            drop_cache(kv_root)
            before = dict(s.backend.pagein)
            sync(device)
            ans = s.ask(q, max_new_tokens=1)
            after = dict(s.backend.pagein)
            ttft = sum(ans.timings.get(k, 0.0) for k in ("query", "retrieve", "page_in", "first_token"))
            # page-in alone, synchronised: the same blocks, from disk again
            drop_cache(kv_root)
            by_level: dict[str, list[int]] = {}
            for b in ans.blocks:
                by_level.setdefault(b.level, []).append(b.block_id)
            sync(device)
            t0 = time.perf_counter()
            for level, ids in by_level.items():
                s.backend.load_kv(level, torch.tensor(ids))
            sync(device)
            t_pg = time.perf_counter() - t0
            rows.append({"ttft_s": ttft, "total_s": ans.timings["total"], "pagein_s": t_pg,
                         "stored_bytes": after["bytes_disk"] - before["bytes_disk"],
                         "decoded_bytes": after["bytes_decoded"] - before["bytes_decoded"],
                         "decode_s": after["seconds_decode"] - before["seconds_decode"],
                         "kv_tokens": ans.kv_tokens})
        s.close()
        med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
        out[label(spec)] = {
            "store_minutes": windows * segment / 0.5 / 60, "store_kv_bytes": disk, "store_write_s": t_store,
            "questions": len(rows), "kv_tokens": med("kv_tokens"),
            "stored_mb_per_question": med("stored_bytes") / 1e6, "decoded_mb_per_question": med("decoded_bytes") / 1e6,
            "pagein_ms_median": 1e3 * med("pagein_s"), "decode_ms_median": 1e3 * med("decode_s"),
            "pagein_gbps_stored": sum(r["stored_bytes"] for r in rows) / sum(r["pagein_s"] for r in rows) / 1e9,
            "pagein_gbps_decoded": sum(r["decoded_bytes"] for r in rows) / sum(r["pagein_s"] for r in rows) / 1e9,
            "ttft_ms_median": 1e3 * med("ttft_s"),
        }
        r = out[label(spec)]
        print(f"pagein {label(spec):24s} {r['stored_mb_per_question']:7.2f} MB stored / {r['decoded_mb_per_question']:.2f}"
              f" MB KV per question; page-in {r['pagein_ms_median']:.1f} ms ({r['pagein_gbps_stored']:.2f} GB/s stored,"
              f" {r['pagein_gbps_decoded']:.2f} GB/s decoded; decode {r['decode_ms_median']:.1f} ms); TTFT "
              f"{r['ttft_ms_median']:.0f} ms", flush=True)
    if not args.path:
        shutil.rmtree(root, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------ report
def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    L = [f"Model `{s['preset']}` ({s['weights']}), device {s['device']} ({s['device_name']}), KV {s['kv_dtype']}, "
         f"torch {s['torch']}. Command: `{s['command']}`", ""]
    if res.get("decode"):
        L += ["Decode of one question's selection (20 patch, 32 frame, 12 segment blocks):", "",
              "| codec | stored MB | KV MB | encode ms | decode ms | decode GB/s of KV | of stored |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        for n, r in res["decode"].items():
            L.append(f"| {n} | {r['stored_mb']:.2f} | {r['decoded_mb']:.2f} | {r['encode_ms']:.2f} | "
                     f"{r['decode_ms']:.2f} | {r['decode_gbps_kv']:.1f} | {r['decode_gbps_stored']:.1f} |")
        L.append("")
    if res.get("quality"):
        L += ["Answers against \"none\" (same retrieved blocks):", "",
              "| codec | questions | first-token logits: rel. L2 error (median / max) | max abs error (median) | "
              "cosine (min) | first token equal | greedy tokens equal | answers equal |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for n, r in res["quality"].items():
            L.append(f"| {n} | {r['questions']} | {r['rel_l2_median']:.4f} / {r['rel_l2_max']:.4f} | "
                     f"{r['max_abs_median']:.3f} | {r['cosine_min']:.5f} | {r['top1_agreement']:.1%} | "
                     f"{r['greedy_agreement']:.1%} | {r['answers_equal']:.1%} |")
        L += ["", "KV paged in for those answers, relative L2 error (keys / values):", "",
              "| codec | " + " | ".join(lv for lv in next(iter(res["quality"].values()))["kv_error"]) + " |",
              "|---|" + "---:|" * len(next(iter(res["quality"].values()))["kv_error"])]
        for n, r in res["quality"].items():
            L.append(f"| {n} | " + " | ".join(f"{e['key_rel_l2']:.4f} / {e['value_rel_l2']:.4f}"
                                             for e in r["kv_error"].values()) + " |")
        L.append("")
    if res.get("pagein"):
        L += ["Every block read from disk (hot tier off, page cache dropped before each question):", "",
              "| codec | store KV bytes | MB stored per question | MB of KV per question | page-in ms (median) | "
              "GB/s stored | GB/s decoded | decode ms | time to first token ms (median) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n, r in res["pagein"].items():
            L.append(f"| {n} | {r['store_kv_bytes'] / 1e9:.2f} GB ({r['store_minutes']:.0f} min) | "
                     f"{r['stored_mb_per_question']:.1f} | {r['decoded_mb_per_question']:.1f} | "
                     f"{r['pagein_ms_median']:.1f} | {r['pagein_gbps_stored']:.2f} | {r['pagein_gbps_decoded']:.2f} | "
                     f"{r['decode_ms_median']:.1f} | {r['ttft_ms_median']:.0f} |")
        L.append("")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llava-onevision-qwen2-0.5b-ov", help="model preset or checkpoint directory")
    ap.add_argument("--device", default=None, help="default: cuda if available")
    ap.add_argument("--codecs", default=DEFAULT_CODECS, help="comma-separated kv_codec settings (names or JSON)")
    ap.add_argument("--parts", default="decode,quality,pagein")
    ap.add_argument("--minutes", type=float, default=2.0, help="quality: minutes of benchmark stream fed (0.5 fps)")
    ap.add_argument("--questions", type=int, default=24, help="questions (quality: of the benchmark; pagein: asked)")
    ap.add_argument("--new-tokens", type=int, default=16, help="quality: greedy answer length compared")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=20, help="decode: timed repeats")
    ap.add_argument("--store-minutes", type=float, default=10.0, help="pagein: minutes of synthetic stream per store")
    ap.add_argument("--path", default=None, help="pagein: folder for the stores (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="folder for codecs.json and codecs.md")
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"decode", "quality", "pagein"}:
        ap.error(f"--parts takes decode, quality, pagein; got {args.parts!r}")
    codecs = codec_list(args.codecs)

    import mukv
    from mukv.session import load_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    adapter = load_model(args.preset, device, None)
    res: dict[str, Any] = {"settings": {
        "preset": args.preset, "device": str(device), "kv_dtype": str(adapter.layout.dtype).replace("torch.", ""),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores",
        "weights": "trained" if args.preset == "mukv-tiny" else "random weights",
        "torch": torch.__version__, "command": "python benchmarks/codec_bench.py " + " ".join(argv or sys.argv[1:]),
        "codecs": [label(c) for c in codecs], "layout": [adapter.layout.num_layers, adapter.layout.num_kv_heads,
                                                         adapter.layout.head_dim]}}
    session = mukv.Session(model=adapter, backend="memory")
    if "decode" in parts:
        res["decode"] = part_decode(adapter, session, codecs, device, args.repeats)
    session.close()
    if "quality" in parts:
        res["quality"] = part_quality(adapter, codecs, args)
    if "pagein" in parts:
        res["pagein"] = part_pagein(adapter, codecs, args, device)
    md = markdown(res)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "codecs.json").write_text(json.dumps(res, indent=1, default=float))
        (out / "codecs.md").write_text(md)
        print(f"wrote {out}/codecs.json, codecs.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
