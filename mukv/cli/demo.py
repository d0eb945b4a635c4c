"""`mukv demo`: the bundled model on a generated stream."""

from __future__ import annotations

import argparse
import textwrap
import time

import numpy as np

from ..errors import InputError

from .common import RANDOM_MODEL, _bar, _levels_line, _say, new_session


#: Question kinds of the demo, ordered so that a few questions cover every level.
DEMO_KINDS = ("object_color", "motion", "mark_color", "count", "object_shape", "dot_color", "color_change",
              "object_place")

#: Kinds of the short clips the demo asks about first (one each).
DEMO_CLIP_KINDS = ("object_color", "motion", "count")


def _demo_clips(session, args: argparse.Namespace) -> int:
    """Part 1 of the demo: one question about each of a few short generated clips (8 frames,
    one questioned scene among others), each fed to a fresh session of the same model, so
    every block fits the answer's context. Returns how many were answered correctly."""
    from ..bench import sample_clip, score
    from ..session import Session

    print("1. short clips: 8 frames each, every block in the answer's context")
    right = 0
    for i, kind in enumerate(DEMO_CLIP_KINDS):
        clip = sample_clip(np.random.default_rng([args.seed, 8, i]), 8, kinds=(kind,))
        with Session(model=session.model, config=session.config, device=session.device) as s:
            s.feed(clip.frames)
            answer = s.ask(clip.question, max_new_tokens=args.max_new_tokens)
        ok = score(answer.text, clip.answer)
        right += ok
        _say(f"  Q: {clip.question}\n  A: {answer.text or '(empty)'!s:<12}  truth: {clip.answer:<10}  "
             f"{'correct' if ok else 'wrong'}  ({answer.kv_tokens:,} KV tokens)")
    print()
    return right


def _cmd_demo(args: argparse.Namespace) -> int:
    from .. import plots
    from ..bench import Benchmark, score
    from ..plots import format_bytes, format_time

    if args.minutes is not None and args.minutes <= 0:
        raise InputError(f"--minutes must be positive; got {args.minutes}")
    if args.questions is not None and args.questions < 1:
        raise InputError(f"--questions must be at least 1; got {args.questions}")
    t0 = time.perf_counter()
    session, name, note = new_session(args)  # a bad policy or configuration fails before a model loads
    load_s = time.perf_counter() - t0
    # Sized to finish in about half a minute on a laptop CPU: the tiny random model
    # ingests a 20-minute stream in that time, a real (larger) model a few minutes.
    fast = name == RANDOM_MODEL or session.device.type == "cuda"
    minutes = args.minutes if args.minutes is not None else (20.0 if fast else 3.0)
    n_questions = args.questions if args.questions is not None else (6 if minutes >= 10 else 3)
    try:
        bench = Benchmark.generate(seed=args.seed, minutes=minutes, questions=n_questions, kinds=DEMO_KINDS,
                                   min_depth_s=min(60.0, minutes * 6.0))
    except ValueError as exc:
        session.close()
        raise InputError(f"cannot build the demo stream: {exc}") from None
    stream, fps = bench.stream, bench.spec.fps
    print("mukv demo: MuKV memory over a generated video stream, questions about moments long past")
    print(f"  stream   {minutes:g} min of video at {fps:g} fps = {stream.num_frames:,} frames "
          f"of {stream.size}x{stream.size} (seed {args.seed}), {len(bench.questions)} questions"
          + ("" if args.minutes is not None else "; --minutes N for another length"))
    print(f"  model    {name} on {session.device} (loaded in {load_s:.1f} s), "
          f"{session.model.tokens_per_frame} visual tokens per frame")
    print(f"  levels   {_levels_line(session.config)}")
    if note:
        print("  " + "\n  ".join(textwrap.wrap(note, 110)))
    print()
    clip_right = _demo_clips(session, args)
    print(f"2. {minutes:g} minutes of stream: questions about moments long past (MuKV retrieves their blocks)")
    results = []  # (question, answer, time asked)
    trace = []
    ingest_s = 0.0
    fed = 0
    bar = _bar(stream.num_frames, "streaming", False if args.no_progress else None)
    try:
        questions = sorted(bench.questions, key=lambda q: q.ask_frame)
        stops = sorted({q.ask_frame + 1 for q in questions} | {stream.num_frames})
        chunk = 64
        for stop in stops:
            while fed < stop:
                end = min(stop, fed + chunk)
                t = time.perf_counter()
                session.feed(stream.frames(fed, end))
                ingest_s += time.perf_counter() - t
                bar.update(end - fed)
                fed = end
                trace.append(plots.memory_snapshot(session))
            for q in (q for q in questions if q.ask_frame + 1 == stop):
                answer = session.ask(q.text, max_new_tokens=args.max_new_tokens)
                asked = float(session.stats()["last_time"])
                results.append((q, answer, asked))
                ok = score(answer.text, q.answer)
                hits = {}
                for level in answer.levels():
                    ranked = sorted((b for b in answer.blocks if b.level == level), key=lambda b: -b.score)
                    rank = next((i + 1 for i, b in enumerate(ranked)
                                 if b.frame_start < q.evidence_end and b.frame_end > q.evidence_start), None)
                    hits[level] = rank
                lines = [
                    f"[{format_time(asked)}] {q.id} ({q.level} evidence, "
                    f"{format_time(q.evidence_start / fps)}, asked {format_time(q.depth_s)} later)",
                    f"  Q: {q.text}",
                    f"  A: {answer.text or '(empty)'!s:<12}  truth: {q.answer:<10}  {'correct' if ok else 'wrong'}",
                    "  retrieved: " + ", ".join(f"{n} {lv}" for lv, n in answer.levels().items())
                    + f" blocks = {answer.kv_tokens:,} KV tokens, answered in {answer.timings['total'] * 1000:.0f} ms",
                    "  evidence scene among them: " + ", ".join(
                        f"{lv} {'rank ' + str(r) if r else 'no'}" for lv, r in hits.items()),
                ]
                _say("\n".join(lines))
    finally:
        bar.close()
    correct = sum(score(a.text, q.answer) for q, a, _ in results)
    st = session.stats()
    n = len(results)
    print()
    print("summary")
    noise = "  (random weights: expect noise)" if name == RANDOM_MODEL else ""
    print(f"  clips      {clip_right}/{len(DEMO_CLIP_KINDS)} correct (8-frame clips, every block in the answer's context)"
          + noise)
    print(f"  answers    {correct}/{n} correct on the stream" + noise)
    found = {}
    for q, a, _ in results:
        for level in a.levels():
            hit = any(b.level == level and b.frame_start < q.evidence_end and b.frame_end > q.evidence_start
                      for b in a.blocks)
            found.setdefault(level, []).append(hit)
    print("  evidence   questions whose scene was retrieved: "
          + ", ".join(f"{lv} {sum(v)}/{len(v)}" for lv, v in found.items()))
    blocks = ", ".join(f"{v['blocks']:,} {k}" for k, v in st["levels"].items())
    print(f"  ingest     {stream.num_frames:,} frames in {ingest_s:.1f} s "
          f"({stream.num_frames / max(ingest_s, 1e-9):,.0f} frames/s): {blocks} blocks")
    mean_ms = 1000 * float(np.mean([a.timings["total"] for _, a, _ in results]))
    mean_ret = 1000 * float(np.mean([a.timings["retrieve"] for _, a, _ in results]))
    print(f"  questions  {mean_ms:.0f} ms per answer on average (retrieval {mean_ret:.1f} ms)")
    stored_tokens = sum(v["tokens"] for v in st["levels"].values())
    raw_tokens = stream.num_frames * session.model.tokens_per_frame
    print("  memory     " + ", ".join(f"{k} {format_bytes(v['bytes'])}" for k, v in st["levels"].items())
          + f" = {format_bytes(st['bytes'])}")
    kv = int(np.mean([a.kv_tokens for _, a, _ in results]))
    print(f"  context    {kv:,} KV tokens per answer, from {stored_tokens:,} stored tokens "
          f"(the uncompressed stream is {raw_tokens:,} frame tokens)")
    outs = []
    if args.plot:
        q, a, asked = max(results, key=lambda r: r[0].depth_s)
        outs.append(plots.plot_retrieval_timeline(
            a, args.plot, duration=asked, evidence=(q.evidence_start / fps, (q.evidence_end - 1) / fps)))
    if args.plot_tokens:
        q = results[0][0]
        frame = stream.frame((q.evidence_start + q.evidence_end - 1) // 2)
        outs.append(plots.plot_token_importance(session, frame, args.plot_tokens,
                                                title=f"token importance, frame of {q.id}: {q.text}"))
    if args.plot_memory:
        outs.append(plots.plot_memory(trace, args.plot_memory))
    for out in outs:
        print(f"  wrote      {out}")
    if not outs:
        print("  pictures   mukv demo --plot timeline.png --plot-tokens tokens.png --plot-memory memory.png")
    session.close()
    return 0

