"""Which score finds a question's scene in MuKV's memory? A study over the stored blocks.

The harness measures finding through whole answers; this study isolates it. One
stream is ingested once into a MuKV memory (the model's levels, the memory
backend); then, for every question, every stored block seen before the question
is scored by several functions of the question and the block, and the study
reports for each level and score how often the best ``k`` blocks reach the
questioned scene (``reached@k``) and the share of them inside it (``share@k``),
per depth bucket. Nothing here changes mukv; the scores that win become
retriever plugins.

Scores (layer ``y``; keys and queries with RoPE removed, heads flattened):

* ``cos_final@y``: cosine of the question's final-token key and the block's mean
  key (MuKV's query vector and block vector at the last layer);
* ``cos_mean@y``: the same with the question's keys averaged over its tokens;
* ``rekv@y``: ReKV's inner product of the question's mean query and the block's mean key;
* ``maxsim@y``: late interaction over tokens: for each question token, the best
  cosine between its key and one of the block's kept keys; summed over tokens;
* ``attn@y``: late interaction by attention: for each question token and query
  head, the log-sum-exp over the block's kept keys of the attention logits;
  averaged over heads, summed over tokens;
* ``cos_cblock@y`` / ``cos_cboth@y`` / ``cos_cunit@y``: ``cos_final`` with the block vectors centred
  on their mean over the stored blocks (the question's key too, for ``cboth``; the unit vectors,
  for ``cunit``), against the common direction that transformer keys share;
* ``cos_white@y`` / ``cos_white3@y``: the same after whitening by the blocks' covariance
  (eigenvalues floored at 1e-2 / 1e-3 of the largest); ``cos_abtt{1,3}@y``: the top 1 / 3
  principal directions removed ("all but the top");
* ``..._all``: the same summed over layers (z-scored per layer over the blocks).

Rows beyond the scores: ``diverse<t>`` (the trained score's top-k with near-duplicate blocks,
cosine above ``t``, passed over: ``retrieval.diversity``), ``from_frames[_diverse<t>]`` (the
segments holding the best frames, in the frames' order), ``confidencex<m>`` (the top ``m x k``
diverse candidates of a level each read alone by the model, ranked by its confidence in its first
answer token; ``confidence_poolx<m>``: reached by that pool itself), ``fusion``, and the
attention reranker ``rerank...x<pool>``.

``--no-rerank`` skips the model-as-reranker rows (one forward per question and pool), ``--only``
keeps the scores whose names start with the given prefixes (``cos_final`` always).

Example::

    python benchmarks/finding_study.py --model mukv-tiny --minutes 64 --questions 99 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mukv-tiny")
    ap.add_argument("--minutes", type=float, default=64.0)
    ap.add_argument("--questions", type=int, default=99)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=str, default="patch=20,frame=32,segment=4", help="top-k per level")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pool", type=float, nargs="+", default=[3.0],
                    help="reranker candidates as multiples of k (one row per multiple)")
    ap.add_argument("--diverse", type=float, nargs="*", default=[0.99, 0.95, 0.9],
                    help="cosine thresholds of the diversity rows (a block too like one already taken is skipped)")
    ap.add_argument("--confidence", nargs="*", default=[], metavar="LEVEL",
                    help="levels whose top diverse candidates are reranked by the model's answer confidence")
    ap.add_argument("--confidence-pool", type=int, default=4, help="candidates of that rerank, as a multiple of k")
    ap.add_argument("--no-rerank", action="store_true", help="skip the model-as-reranker rows (slow)")
    ap.add_argument("--only", default=None, help="comma-separated score prefixes to keep (e.g. cos_)")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


@torch.inference_mode()
def question_states(model, prefix, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(queries [Y, Hq, n, D], keys [Y, Hk, n, D])`` of the question after the system prompt, RoPE removed."""
    from mukv.model import kv_to_cache
    from mukv.rope import rerotate
    from mukv.local_window import _Masked

    ids = model.tokenize(model.query_template.format(question=text))
    n, p = ids.numel(), prefix.length
    cache = kv_to_cache(prefix.kv, extra=n)
    pos = torch.arange(p, p + n)
    qs, ks = [], []

    def hook(module, query, key, value, scaling):
        qs.append(query[0])
        ks.append(key[0, :, -n:])

    with _Masked(None, hook):
        model.language_model(input_ids=ids[None], past_key_values=cache, position_ids=pos[None], use_cache=True)
    codes, zero = model.text_codes(pos), model.text_codes(torch.zeros_like(pos))
    q = rerotate(model, torch.stack(qs), codes, zero).float()
    k = rerotate(model, torch.stack(ks), codes, zero).float()
    return q, k


@torch.inference_mode()
def answer_attention(model, prefix, text: str, kv: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The answer position's attention over candidate blocks assembled as one context.

    Args:
        kv: ``[c, Y, 2, Hk, K, D]`` the candidates' KV (keys at ``codes [c, K]``), in the order given.

    Returns:
        ``[Y, Hq, c]``: per layer and query head, the attention mass the last token of the answer
        prompt puts on each candidate's tokens.
    """
    from mukv.model import kv_to_cache
    from mukv.rope import rerotate
    from mukv.local_window import _Masked

    c, y, _, hk, kk, d = kv.shape
    p = prefix.length
    body = kv.permute(1, 2, 3, 0, 4, 5).reshape(y, 2, hk, c * kk, d).clone()
    new, nxt = model.timeline(codes.reshape(-1), torch.arange(c).repeat_interleave(kk), p)
    body[:, 0] = rerotate(model, body[:, 0], codes.reshape(-1), new)
    ctx = torch.cat([prefix.kv, body[:, :, None]], dim=4)
    ids = model.tokenize(model.answer_template.format(question=text))
    cache = kv_to_cache(ctx, extra=ids.numel())
    pos = torch.arange(nxt, nxt + ids.numel())
    got = []

    def hook(module, query, key, value, scaling):
        qh = query[0, :, -1].float()  # [Hq, D]
        kf = key[0].float().repeat_interleave(qh.shape[0] // key.shape[1], dim=0)  # [Hq, C, D]
        w = torch.softmax(torch.einsum("hd,hcd->hc", qh, kf) * (scaling or d**-0.5), dim=-1)
        got.append(w[:, p : p + c * kk].reshape(qh.shape[0], c, kk).sum(dim=2))

    with _Masked(None, hook):
        model.language_model(input_ids=ids[None], past_key_values=cache, position_ids=pos[None], use_cache=True)
    return torch.stack(got)  # [Y, Hq, c]


@torch.inference_mode()
def answer_confidence(model, prefix, text: str, kv: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The model's confidence in its first answer token when it reads each candidate block alone.

    Args:
        kv: ``[c, Y, 2, Hk, K, D]`` the candidates' KV (keys at ``codes [c, K]``).

    Returns:
        ``[c]``: the largest next-token probability at the answer prompt's last position, the
        context being the system prompt and that one candidate.
    """
    from mukv.model import kv_to_cache
    from mukv.rope import rerotate

    c, y, _, hk, kk, d = kv.shape
    p = prefix.length
    ids = model.tokenize(model.answer_template.format(question=text))
    out = []
    for i in range(c):
        body = kv[i].clone()  # [Y, 2, Hk, K, D]
        new, nxt = model.timeline(codes[i], torch.zeros(kk, dtype=torch.long), p)
        body[:, 0] = rerotate(model, body[:, 0], codes[i], new)
        ctx = torch.cat([prefix.kv, body[:, :, None]], dim=4)
        cache = kv_to_cache(ctx, extra=ids.numel())
        pos = torch.arange(nxt, nxt + ids.numel())
        hidden = model.language_model(input_ids=ids[None], past_key_values=cache, position_ids=pos[None],
                                      use_cache=True).last_hidden_state[0, -1]
        out.append(torch.softmax(model.lm_head(hidden).float(), dim=-1).max())
    return torch.stack(out)


def zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(dim=-1, keepdim=True)) / x.std(dim=-1, keepdim=True).clamp_min(1e-6)


def block_scores(q: torch.Tensor, k: torch.Tensor, keys: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores of blocks with kept keys ``keys [N, Y, Hk, K, D]`` (RoPE removed) for a question with
    queries ``q [Y, Hq, n, D]`` and keys ``k [Y, Hk, n, D]``: name -> ``[N]``."""
    n_blocks, y, hk, kk, d = keys.shape
    hq = q.shape[1]
    out: dict[str, torch.Tensor] = {}
    mean_key = keys.mean(dim=3)  # [N, Y, Hk, D]
    layers = {}
    for layer in range(y):
        mk = mean_key[:, layer].reshape(n_blocks, -1)  # [N, V]
        s = {
            "cos_final": F.cosine_similarity(mk, k[layer, :, -1].reshape(1, -1), dim=-1),
            "cos_mean": F.cosine_similarity(mk, k[layer].mean(dim=1).reshape(1, -1), dim=-1),
            "rekv": mk @ q[layer].mean(dim=1).reshape(hk, hq // hk, d).sum(dim=1).reshape(-1),
        }
        qf = k[layer, :, -1].reshape(1, -1)
        mu = mk.mean(dim=0, keepdim=True)
        s["cos_cblock"] = F.cosine_similarity(mk - mu, qf, dim=-1)
        s["cos_cboth"] = F.cosine_similarity(mk - mu, qf - mu, dim=-1)
        unit = F.normalize(mk, dim=-1)
        s["cos_cunit"] = F.cosine_similarity(unit - unit.mean(dim=0, keepdim=True), qf, dim=-1)
        xc = mk - mu
        cov = xc.T @ xc / max(1, n_blocks - 1)
        ev, evec = torch.linalg.eigh(cov + 1e-6 * cov.diagonal().mean() * torch.eye(cov.shape[0]))
        for tag, eps in (("white", 1e-2), ("white3", 1e-3)):
            w = evec @ torch.diag((ev.clamp_min(0) + eps * ev.max()).rsqrt()) @ evec.T
            s[f"cos_{tag}"] = F.cosine_similarity(xc @ w, (qf - mu) @ w, dim=-1)
        # all-but-the-top: remove the block vectors' top principal directions
        for r in (1, 3):
            top = evec[:, -r:]
            s[f"cos_abtt{r}"] = F.cosine_similarity(xc - xc @ top @ top.T, qf - (qf - mu) @ top @ top.T - mu, dim=-1)
        bk = F.normalize(keys[:, layer].permute(0, 2, 1, 3).reshape(n_blocks, kk, hk * d), dim=-1)  # [N, K, V]
        qk = F.normalize(k[layer].permute(1, 0, 2).reshape(-1, hk * d), dim=-1)  # [n, V]
        s["maxsim"] = torch.einsum("nv,bkv->bnk", qk, bk).amax(dim=2).sum(dim=1)
        exp = keys[:, layer].repeat_interleave(hq // hk, dim=1)  # [N, Hq, K, D]
        logits = torch.einsum("hnd,bhkd->bhnk", q[layer], exp) / d**0.5
        s["attn"] = logits.logsumexp(dim=3).mean(dim=1).sum(dim=1)
        for name, v in s.items():
            out[f"{name}@{layer}"] = v
            layers.setdefault(name, []).append(zscore(v))
    for name, parts in layers.items():
        out[f"{name}_all"] = torch.stack(parts).sum(dim=0)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import mukv
    from mukv.bench import Benchmark
    from mukv.bench.questions import _depth_bucket
    from mukv.plugins.retrievers.diversity import diverse_order
    from mukv.rope import rerotate
    from mukv.session import load_model

    model = load_model(args.model, torch.device("cpu"), None)
    bench = Benchmark.generate(seed=args.seed, minutes=args.minutes, questions=args.questions)
    stream = bench.stream
    tops = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in args.k.split(",")}
    with mukv.Session(model=model, policy="mukv") as s:
        for i in range(0, stream.num_frames, 256):
            s.feed(stream.frames(i, min(stream.num_frames, i + 256)))
        levels = {}
        for lp in s.levels:
            name = lp.level.name
            st = s.backend._levels[name]
            n = st.n
            kv, pos = st.rows[:n].reshape(n, *st.block_shape), st.positions[:n]
            y, hk, kk, d = kv.shape[1], kv.shape[3], kv.shape[4], kv.shape[5]
            keys = kv[:, :, 0].permute(1, 2, 0, 3, 4).reshape(y, hk, n * kk, d)
            codes = pos.reshape(-1)
            raw = rerotate(model, keys, codes, model.text_codes(torch.zeros_like(codes)))
            levels[name] = (raw.reshape(y, hk, n, kk, d).permute(2, 0, 1, 3, 4).float(),
                            st.meta["frame_start"][:n], st.meta["frame_end"][:n])
        prefix = s.prefix
        stored = {}
        for lp in s.levels:
            st = s.backend._levels[lp.level.name]
            stored[lp.level.name] = (st.rows[: st.n].reshape(st.n, *st.block_shape), st.positions[: st.n])
    stats: dict[tuple, list] = {}
    last = model.layout.num_layers - 1
    # each stored block's unit vector (its kept keys' mean at the last layer), for the diversity rows
    units = {name: F.normalize(keys[:, last].mean(dim=2).reshape(keys.shape[0], -1), dim=-1)
             for name, (keys, _, _) in levels.items()}
    for q in bench.questions:
        qq, qk = question_states(model, prefix, q.text)
        depth = _depth_bucket(q.depth_s)
        ranked = {}
        for name, (keys, fs, fe) in levels.items():
            seen = fe <= q.ask_frame + 1
            idx = seen.nonzero().reshape(-1)
            if idx.numel() == 0:
                continue
            kk = min(tops.get(name, 8), idx.numel())
            inside = (fs[idx] < q.evidence_end) & (fe[idx] > q.evidence_start)
            scores = block_scores(qq, qk, keys[idx])
            ranked[name] = (idx, scores[f"cos_final@{last}"], inside, kk)
            for score, v in scores.items():
                if args.only and not score.startswith(tuple(args.only.split(","))) and not score.startswith("cos_final"):
                    continue
                top = v.topk(kk).indices
                hit = inside[top]
                for key in ((name, score, "all"), (name, score, depth)):
                    stats.setdefault(key, []).append((float(hit.any()), float(hit.float().mean())))
        # diversity: the top-k by the trained score with near-duplicates passed over (retrieval.diversity)
        for name, (idx, v, inside, kk) in ranked.items():
            order = v.argsort(descending=True)
            for thr in args.diverse:
                hit = inside[order[diverse_order(units[name][idx][order], kk, thr)]]
                for key in ((name, f"diverse{thr:g}", "all"), (name, f"diverse{thr:g}", depth)):
                    stats.setdefault(key, []).append((float(hit.any()), float(hit.float().mean())))
        # the model as its own reranker by confidence: each of the top diverse candidates read alone
        for name in args.confidence:
            if name not in ranked:
                continue
            idx, v, inside, kk = ranked[name]
            order = v.argsort(descending=True)
            cand = order[diverse_order(units[name][idx][order], args.confidence_pool * kk, 0.99)]
            kv, codes = stored[name]
            conf = answer_confidence(model, prefix, q.text, kv[idx[cand]], codes[idx[cand]])
            top = cand[conf.topk(min(kk, cand.numel())).indices]
            for tag, sel in (("confidence", top), ("confidence_pool", cand)):
                hit = inside[sel]
                for key in ((name, f"{tag}x{args.confidence_pool}", "all"), (name, f"{tag}x{args.confidence_pool}", depth)):
                    stats.setdefault(key, []).append((float(hit.any()), float(hit.float().mean())))
        # coarse from fine: the segments holding the best (diverse) frames, in the frames' order
        if "frame" in ranked and "segment" in ranked:
            fidx, fv, _, fk = ranked["frame"]
            sidx, _, sinside, sk = ranked["segment"]
            funit = units["frame"][fidx]
            ffs = levels["frame"][1][fidx]
            sfs, sfe = levels["segment"][1][sidx], levels["segment"][2][sidx]
            for thr in [None, *args.diverse]:
                forder = fv.argsort(descending=True)
                if thr is not None:
                    forder = forder[diverse_order(funit[forder], forder.numel(), thr)]
                segs: list[int] = []
                for j in forder.tolist():
                    own = ((sfs <= ffs[j]) & (sfe > ffs[j])).nonzero().reshape(-1)
                    if own.numel() and int(own[0]) not in segs:
                        segs.append(int(own[0]))
                    if len(segs) == sk:
                        break
                hit = sinside[torch.tensor(segs, dtype=torch.long)] if segs else torch.zeros(1, dtype=torch.bool)
                tag = "from_frames" + ("" if thr is None else f"_diverse{thr:g}")
                for key in (("segment", tag, "all"), ("segment", tag, depth)):
                    stats.setdefault(key, []).append((float(hit.any()), float(hit.float().mean())))
        # fusion: a block also scores by the reciprocal ranks of the finer blocks inside its frames
        for name, (idx, v, inside, kk) in ranked.items():
            fs, fe = levels[name][1][idx], levels[name][2][idx]
            fused = 1.0 / (60 + v.argsort(descending=True).argsort().float())
            for other, (oidx, ov, _, _) in ranked.items():
                if other == name:
                    continue
                ofs, ofe = levels[other][1][oidx], levels[other][2][oidx]
                orr = 1.0 / (60 + ov.argsort(descending=True).argsort().float())  # [M]
                within = (ofs[None] >= fs[:, None]) & (ofe[None] <= fe[:, None])  # [N, M]: finer blocks inside
                fused = fused + (within.float() * orr[None]).amax(dim=1)
            hit = inside[fused.topk(kk).indices]
            for key in ((name, "fusion", "all"), (name, "fusion", depth)):
                stats.setdefault(key, []).append((float(hit.any()), float(hit.float().mean())))
            # the model as its own reranker: the top 3k candidates by the trained score, assembled in
            # time order, ranked by the attention the answer position gives each
            for pool in ([] if args.no_rerank else args.pool):
                cand = v.topk(min(v.numel(), int(pool * kk))).indices.sort().values
                kv, codes = stored[name]
                att = answer_attention(model, prefix, q.text, kv[idx[cand]], codes[idx[cand]])  # [Y, Hq, c]
                variants = {"rerank_all": att.mean(dim=(0, 1))}
                for yy in range(att.shape[0]):
                    variants[f"rerank@{yy}"] = att[yy].mean(dim=0)
                    variants[f"rerank@{yy}h01"] = att[yy, :2].mean(dim=0)
                variants["pool"] = torch.ones(cand.numel())  # reached by the pool itself (any of it)
                for vname, sc in variants.items():
                    top = cand if vname == "pool" else cand[sc.topk(min(kk, cand.numel())).indices]
                    hit = inside[top]
                    for key in ((name, f"{vname}x{pool:g}", "all"), (name, f"{vname}x{pool:g}", depth)):
                        stats.setdefault(key, []).append((float(hit.any()), float(hit.float().mean())))
            chance = float(inside.float().mean())
            for key in ((name, "chance", "all"), (name, "chance", depth)):
                stats.setdefault(key, []).append((1 - (1 - chance) ** kk, chance))
    table = {f"{lv}|{sc}|{dp}": {"reached": sum(a for a, _ in v) / len(v), "share": sum(b for _, b in v) / len(v),
                                 "n": len(v)} for (lv, sc, dp), v in stats.items()}
    print(f"model {args.model}, {args.minutes:g} min, seed {args.seed}, {len(bench.questions)} questions; "
          f"reached@k / share@k over all depths (k: {tops})")
    depths = sorted({key.split("|")[2] for key in table} - {"all"})
    for lv in levels:
        rows = sorted(((sc, t) for key, t in table.items() for l2, sc, dp in [key.split("|")] if l2 == lv and dp == "all"),
                      key=lambda r: -r[1]["reached"])
        print(f"\n{lv}: score, reached@k and share@k (all depths), reached@k per depth {depths}")
        for sc, t in rows:
            per = " ".join(f"{table.get(f'{lv}|{sc}|{d}', {}).get('reached', float('nan')):.2f}" for d in depths)
            print(f"  {sc:<18} reached {t['reached']:.3f}  share {t['share']:.3f}   {per}")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
