"""Which keys of a model could find a question's scene on a long stream?

MuKV retrieves blocks by the cosine between a query vector (the paper: the
last-layer key of the question's final token) and each block's vector (the mean
of its last-layer keys). This diagnostic asks, for every layer of the model and
two ways of pooling the question (its final token; the mean over its tokens),
how well that cosine ranks the frames of the questioned scene among all frames
seen before the question, with whole-frame blocks (every token kept). It loads
nothing but the model and a generated stream, and changes nothing in mukv.

For each question, "share@k" is the part of the top-k frames that lie in the
scene; "chance" is what k frames drawn at random would give. Example (the
figures in docs/answer-quality-results.md)::

    python benchmarks/diagnose_retrieval.py --model mukv-tiny --minutes 8 --questions 33 --top-k 32
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
    ap.add_argument("--model", default="mukv-tiny", help="preset name or checkpoint directory")
    ap.add_argument("--minutes", type=float, default=8.0, help="stream length in minutes (0.5 fps)")
    ap.add_argument("--questions", type=int, default=33)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top-k", type=int, default=32, help="frames retrieved per question")
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    return ap.parse_args(argv)


@torch.no_grad()
def question_keys(adapter, prefix, text: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(final-token key, mean key over the question's tokens)``, each ``[H * D]``,
    as ``HFVideoLLM.query_vector`` computes the first one at the last layer."""
    from mukv import train as T

    ids = adapter.tokenize(adapter.query_template.format(question=text))[None]
    p = prefix[0][0].shape[2]
    cache = T._cache([(k, v) for k, v in prefix])
    positions = torch.arange(p, p + ids.shape[1])[None]
    with T._ours():
        adapter.language_model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True)
    out = []
    for layer in cache.layers:
        keys = layer.keys[0, :, p:, :].float()  # [H, n, D]
        out.append((keys[:, -1].reshape(-1), keys.mean(dim=1).reshape(-1)))
    return out


@torch.no_grad()
def answer_queries(adapter, prefix, text: str, offset: int = 0) -> list[torch.Tensor]:
    """Per layer ``[Hq, D]``: the attention queries (RoPE applied) of the answer position (the
    last token of the answer prompt, the one trained to look at the evidence), with only the
    system prompt before it, placed ``offset`` positions after it."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    from mukv import train as T

    lm = adapter.language_model
    ids = adapter.tokenize(adapter.answer_template.format(question=text))[None]
    p = prefix[0][0].shape[2]
    positions = torch.arange(p + offset, p + offset + ids.shape[1])[None]
    seen: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, a, kw, y=y: seen.__setitem__(y, a[0] if a else kw["hidden_states"]), with_kwargs=True)
        for y, layer in enumerate(lm.layers)]
    try:
        with T._ours():
            lm(input_ids=ids, past_key_values=T._cache([(k, v) for k, v in prefix]), position_ids=positions,
               use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for y, layer in enumerate(lm.layers):
        h = layer.input_layernorm(seen[y][:, -1:])  # [1, 1, E]
        att = layer.self_attn
        q = att.q_proj(h).view(1, 1, -1, att.head_dim).transpose(1, 2)  # [1, Hq, 1, D]
        cos, sin = lm.rotary_emb(h, positions[:, -1:])
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        out.append(q[0, :, 0].float())
    return out


@torch.no_grad()
def frame_token_keys(adapter, prefix, frames: torch.Tensor, batch: int = 64) -> list[torch.Tensor]:
    """Per layer ``[F, Hkv, T, D]``: every frame's keys, prefilled alone after the system prompt."""
    from mukv import train as T

    out: list[list[torch.Tensor]] = []
    for i in range(0, frames.shape[0], batch):
        visual = T.encode(adapter, frames[None, i:i + batch])[0]
        kv, _ = T.prefill(adapter, prefix, visual)
        for y, (k, _) in enumerate(kv):
            if len(out) <= y:
                out.append([])
            out[y].append(k.float())
    return [torch.cat(parts) for parts in out]


def main(argv=None) -> int:
    args = parse_args(argv)
    from mukv import train as T
    from mukv.bench import Benchmark
    from mukv.session import load_model

    adapter = load_model(args.model, torch.device("cpu"), None)
    T.training_mode(adapter, True)
    adapter.model.eval()
    bench = Benchmark.generate(seed=args.seed, minutes=args.minutes, questions=args.questions)
    stream = bench.stream
    frames = torch.from_numpy(stream.frames(0, stream.num_frames))
    prefix = T.prefix_kv(adapter, None)
    tk = frame_token_keys(adapter, prefix, frames)
    # a frame's vector: the mean of its keys, flattened over heads (whole-frame blocks, every token kept)
    fk = [F.normalize(k.mean(dim=2).reshape(k.shape[0], -1), dim=-1) for k in tk]
    rows = {}
    chance = []
    for q in bench.questions:
        seen = q.ask_frame + 1
        k = min(args.top_k, seen)
        chance.append((q.evidence_end - q.evidence_start) / seen)
        def share(scores: torch.Tensor) -> float:
            top = scores.topk(k).indices
            return float(((top >= q.evidence_start) & (top < q.evidence_end)).float().mean())

        for y, (last, mean) in enumerate(question_keys(adapter, prefix, q.text)):
            for pool, vec in (("final token", last), ("mean of tokens", mean)):
                rows.setdefault((y, pool), []).append(share(fk[y][:seen] @ F.normalize(vec, dim=0)))
        # attention-scored: the answer position's query heads against every token of a frame,
        # a frame scored by its best token under its best head of the layer (log-sum-exp over tokens)
        for y, qy in enumerate(answer_queries(adapter, prefix, q.text, offset=stream.num_frames * tk[0].shape[2])):
            keys = tk[y][:seen]  # [F, Hkv, T, D]
            group = qy.shape[0] // keys.shape[1]
            logits = torch.einsum("hd,fhtd->fht", qy, keys.repeat_interleave(group, dim=1)) / qy.shape[1] ** 0.5
            per_head = logits.logsumexp(dim=2)  # [F, Hq]
            rows.setdefault((y, "attention, best head"), []).append(share(per_head.max(dim=1).values))
            rows.setdefault((y, "attention, heads 0-1"), []).append(share(per_head[:, :2].max(dim=1).values))
    T.training_mode(adapter, False)
    n = len(bench.questions)
    print(f"model {args.model}, {args.minutes:g} min ({stream.num_frames} frames), {n} questions, "
          f"share of the top-{args.top_k} frames inside the questioned scene (chance {sum(chance) / n:.3f})")
    pools = ["final token", "mean of tokens", "attention, best head", "attention, heads 0-1"]
    print("| layer | key cosine, final token (the paper's) | key cosine, mean of the question's tokens "
          "| answer position's attention, best head | the same, heads 0-1 (supervised in training) |")
    print("|---|---|---|---|---|")
    layers = sorted({y for y, _ in rows})
    table = {}
    for y in layers:
        table[y] = {pool: sum(rows[(y, pool)]) / n for pool in pools}
        print(f"| {y}{' (last)' if y == layers[-1] else ''} | " + " | ".join(f"{table[y][p]:.3f}" for p in pools)
              + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "chance": sum(chance) / n, "layers": table},
                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
