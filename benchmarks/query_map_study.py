"""Can a linear map of the question's vector, fitted on training streams, find scenes better?

MuKV ranks a level's blocks by the cosine of the question's vector ``q [V]`` (the last layer's key
of its final token) and each block's vector. Every zero-shot alternative measured so far is at
chance on ``mukv-tiny`` (``benchmarks/finding_study.py``): only the score the model's retrieval loss
trained finds scenes. This study asks whether that score can be sharpened without touching the
model: a query-side map ``q -> A q + c`` (``A [V, V]`` started at the identity, ``c [V]`` a bias
that acts as a per-block prior), fitted on streams of *training* seeds by a listwise loss (the
softmax over the blocks stored before the question, the questioned scene's blocks positive),
regularised towards the identity with weight ``lam``. A query-side map needs no change to stored
vectors or indexes, so it would work with every retriever and backend.

For each level it reports ``reached@k`` (some of the top ``k`` blocks lie in the questioned scene)
and ``share@k`` on the training streams and on held-out test streams, for the identity (MuKV as it
ranks today) and for each ``lam``. Streams are ingested once into MuKV's memory and cached in
``--cache`` (block vectors, frame spans, question vectors).

Example::

    python benchmarks/query_map_study.py --train-seeds 20 21 22 23 24 25 26 27 28 29 \\
        --test-seeds 2 3 4 --minutes 64 --lams 0.1 0.01 0.001 --cache /tmp/qmap --out qmap.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

TOP_K = {"patch": 20, "frame": 32, "segment": 4}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mukv-tiny")
    ap.add_argument("--train-seeds", type=int, nargs="+", required=True)
    ap.add_argument("--test-seeds", type=int, nargs="+", required=True)
    ap.add_argument("--minutes", type=float, default=64.0)
    ap.add_argument("--questions", type=int, default=99)
    ap.add_argument("--lams", type=float, nargs="+", default=[0.1, 0.01, 0.001],
                    help="weights of the pull towards the identity map")
    ap.add_argument("--steps", type=int, default=400, help="Adam steps of each fit (full batch)")
    ap.add_argument("--levels", nargs="+", default=list(TOP_K))
    ap.add_argument("--cache", required=True, help="folder for the ingested streams' vectors")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def stream_vectors(model, seed: int, minutes: float, questions: int, cache: Path) -> dict:
    """Ingest one benchmark stream into MuKV's memory; its blocks' vectors and spans per level, and each
    question's vector and scene (cached)."""
    import mukv
    from mukv.bench import Benchmark

    path = cache / f"seed{seed}-{minutes:g}min-{questions}q.pt"
    if path.exists():
        return torch.load(path)
    bench = Benchmark.generate(seed=seed, minutes=minutes, questions=questions)
    stream = bench.stream
    with mukv.Session(model=model, policy="mukv") as s:
        for i in range(0, stream.num_frames, 256):
            s.feed(stream.frames(i, min(stream.num_frames, i + 256)))
        levels = {}
        for lp in s.levels:
            name = lp.level.name
            n = s.backend.count(name)
            meta = s.backend.metadata(name, torch.arange(n))
            levels[name] = {"vec": s.backend.vectors(name, torch.arange(n)).float(),
                            "fs": meta.frame_start.clone(), "fe": meta.frame_end.clone()}
        qs = [{"v": model.query_vector(s.prefix, q.text).float(), "ask": q.ask_frame, "es": q.evidence_start,
               "ee": q.evidence_end} for q in bench.questions]
    data = {"levels": levels, "questions": qs}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(data, tmp)
    tmp.replace(path)  # an interrupted run leaves no half-written cache that a later run would load
    return data


def level_batch(data: dict, level: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(unit [N, V], Q [q, V], seen [q, N], inside [q, N])`` of one stream's level, for the questions
    whose scene has a stored block (the others cannot be found by any score)."""
    lv = data["levels"][level]
    unit = F.normalize(lv["vec"], dim=-1)
    fs, fe = lv["fs"], lv["fe"]
    qs = data["questions"]
    q = torch.stack([x["v"] for x in qs])
    ask, es, ee = (torch.tensor([x[key] for x in qs]) for key in ("ask", "es", "ee"))
    seen = fe[None] <= ask[:, None] + 1
    inside = seen & (fs[None] < ee[:, None]) & (fe[None] > es[:, None])
    keep = inside.any(dim=1)
    return unit, q[keep], seen[keep], inside[keep]


def evaluate(batches: list, a: torch.Tensor, c: torch.Tensor, k: int) -> dict[str, float]:
    """``reached@k`` and ``share@k`` of the ranking by ``(A q + c) . unit`` over the seen blocks."""
    reached = share = 0.0
    n = 0
    for unit, q, seen, inside in batches:
        if q.shape[0] == 0:
            continue
        s = ((q @ a.T + c) @ unit.T).masked_fill(~seen, float("-inf"))
        top = s.topk(min(k, unit.shape[0]), dim=1).indices
        hit = inside.gather(1, top) & seen.gather(1, top)
        reached += hit.any(dim=1).float().sum().item()
        share += hit.float().mean(dim=1).sum().item()
        n += q.shape[0]
    return {"reached": reached / max(n, 1), "share": share / max(n, 1), "questions": n}


def fit(batches: list, lam: float, steps: int, lr: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [V, V], c [V])`` minimising the listwise loss plus ``lam * (|A - I|^2 + |c|^2)``."""
    v = batches[0][1].shape[1]
    eye = torch.eye(v)
    a = eye.clone().requires_grad_(True)
    c = torch.zeros(v, requires_grad=True)
    log_t = torch.tensor(3.0, requires_grad=True)  # inverse temperature of the softmax, learned
    opt = torch.optim.Adam([a, c, log_t], lr=lr)
    total = sum(b[1].shape[0] for b in batches)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.zeros(())
        for unit, q, seen, inside in batches:
            if q.shape[0] == 0:
                continue
            s = F.normalize(q @ a.T + c, dim=-1) @ unit.T * log_t.exp()
            loss = loss + (torch.logsumexp(s.masked_fill(~seen, float("-inf")), 1)
                           - torch.logsumexp(s.masked_fill(~inside, float("-inf")), 1)).sum()
        loss = loss / max(total, 1) + lam * (((a - eye) ** 2).sum() + (c**2).sum())
        loss.backward()
        opt.step()
    return a.detach(), c.detach()


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from mukv.session import load_model

    model = load_model(args.model, torch.device("cpu"), None)
    cache = Path(args.cache)
    t0 = time.perf_counter()
    train = [stream_vectors(model, s, args.minutes, args.questions, cache) for s in args.train_seeds]
    test = [stream_vectors(model, s, args.minutes, args.questions, cache) for s in args.test_seeds]
    print(f"model {args.model}, {args.minutes:g} min; train seeds {args.train_seeds}, test seeds {args.test_seeds} "
          f"({time.perf_counter() - t0:.0f} s to ingest or load)")
    results: dict[str, list] = {}
    for level in args.levels:
        k = TOP_K.get(level, 8)
        tr = [level_batch(d, level) for d in train]
        te = [level_batch(d, level) for d in test]
        v = tr[0][1].shape[1]
        eye, zero = torch.eye(v), torch.zeros(v)
        rows = [{"map": "identity", "lam": None, "train": evaluate(tr, eye, zero, k), "test": evaluate(te, eye, zero, k)}]
        for lam in args.lams:
            a, c = fit(tr, lam, args.steps)
            rows.append({"map": "fitted", "lam": lam, "train": evaluate(tr, a, c, k), "test": evaluate(te, a, c, k),
                         "distance_from_identity": float((a - eye).norm()), "bias_norm": float(c.norm())})
        results[level] = rows
        print(f"\n{level} (top {k}): map, reached@k train / test, share@k test")
        for r in rows:
            name = "identity" if r["lam"] is None else f"fitted, lam {r['lam']:g}"
            print(f"  {name:<22} {r['train']['reached']:.3f} / {r['test']['reached']:.3f}   {r['test']['share']:.3f}"
                  f"   ({r['train']['questions']} / {r['test']['questions']} questions)")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "levels": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
