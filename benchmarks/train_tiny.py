"""Train mukv-tiny (or resume a run), evaluate it per question kind and regime, export it.

Examples::

    # a short CPU smoke run of the toy shape
    python benchmarks/train_tiny.py --shape toy --steps 20 --batch 4 --workers 0 --out runs/toy

    # the real run on the GPU machine, in calls of at most 10 minutes
    python benchmarks/train_tiny.py --steps 6000 --time-limit 470 --out $OUT/ckpt
    python benchmarks/train_tiny.py --steps 6000 --time-limit 470 --resume runs/ckpt --out $OUT/ckpt \\
        --export $OUT/mukv-tiny

Training stops at ``--steps`` (the length of the cosine schedule) or after
``--time-limit`` seconds, whichever comes first, then saves a resumable
checkpoint in ``--out`` (float32 weights and bf16 Adam moments, files of at most
15 MB, and ``state.json``), evaluates held-out clips (``--eval-per-kind`` per
kind, in every regime, batched through the training forward) and, with
``--export``, writes the shippable bf16 checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--shape", default="mukv-tiny", choices=["mukv-tiny", "toy", "small", "small-196", "medium", "medium-196"],
                    help="model shape (mukv.train.SHAPES)")
    ap.add_argument("--out", required=True, help="checkpoint directory written at the end (and every --save-every s)")
    ap.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    ap.add_argument("--steps", type=int, default=6000, help="total optimizer steps (length of the LR schedule)")
    ap.add_argument("--time-limit", type=float, default=None, help="stop training after this many seconds")
    ap.add_argument("--save-every", type=float, default=None, help="also checkpoint every this many seconds")
    ap.add_argument("--batch", type=int, default=64, help="clips per step")
    ap.add_argument("--frames", type=int, default=8, help="frames per training clip")
    ap.add_argument("--max-questions", type=int, default=3, help="questioned scenes packed into one clip")
    ap.add_argument("--single", type=float, default=0.3, help="share of plain sample_clip clips (one question)")
    ap.add_argument("--plain", type=float, default=0.0, help="share of sample_clip clips without distractors")
    ap.add_argument("--fillers", choices=["one", "many"], default="one",
                    help="packed clips: one distractor scene per gap (default), or many short filler scenes of 2 to "
                         "--max-filler frames (clips that look like a long stream's scenes)")
    ap.add_argument("--max-filler", type=int, default=12, help="longest filler scene with --fillers many")
    ap.add_argument("--hard-negatives", type=float, default=0.0,
                    help="share of filler scenes built around one key object of a questioned scene (never both)")
    ap.add_argument("--init", default=None,
                    help="start from an exported checkpoint's weights (e.g. mukv/assets/mukv-tiny) with a fresh "
                         "optimizer; later calls resume from --out with --resume")
    ap.add_argument("--eval-frames", type=int, default=8,
                    help="frames of the held-out evaluation clips (8: the shipped figures' clips)")
    ap.add_argument("--aux", type=float, default=0.0,
                    help="weight of the per-token perception loss (targets from the pixel oracle)")
    ap.add_argument("--aux-lm", type=float, default=0.0,
                    help="weight of the same loss read from the language model's final hidden states at visual tokens")
    ap.add_argument("--vis-rms", type=float, default=1.0,
                    help="weight of (log(rms_visual / rms_text))**2, keeping visual tokens at the text-embedding scale")
    ap.add_argument("--stage1-steps", type=int, default=0,
                    help="curriculum: the first this many steps use --stage1-frames-frame clips, "
                         "--stage1-plain of them without distractors")
    ap.add_argument("--stage1-seconds", type=float, default=None,
                    help="also end stage 1 after this many seconds of this call (whichever comes first)")
    ap.add_argument("--stage1-frames", type=int, default=4)
    ap.add_argument("--stage1-plain", type=float, default=1.0)
    ap.add_argument("--stage1-batch", type=int, default=None, help="clips per stage-1 step (default: --batch)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--restart-schedule", action="store_true",
                    help="on --resume: start a new warmup + cosine schedule at the resumed step, ending at --steps")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--weights", default="full=1,frames=1,mukv=1", help="loss weight per regime")
    ap.add_argument("--stage1-weights", default=None,
                    help="loss weight per regime during the first --stage1-steps (default: --weights); "
                    "e.g. full=1,frames=0,mukv=0 trains only the whole-clip regime first, about 3x cheaper a step")
    ap.add_argument("--extra-questions", type=int, default=0,
                    help="up to this many more questions per questioned scene (its static facts: marks, dots, "
                    "colour / shape / side of a uniquely named object), every one checked by construction")
    ap.add_argument("--lr-by-time", action="store_true",
                    help="warm-up then cosine over this call's --time-limit instead of over --steps")
    ap.add_argument("--attn-sup", type=float, default=0.0,
                    help="weight of the attention supervision: -log of the attention mass that the answer position "
                    "of --attn-heads heads in --attn-layers puts on the question's evidence tokens (regimes full, frames)")
    ap.add_argument("--attn-layers", default="3,4", help="language-model layers of the supervised heads")
    ap.add_argument("--aux-mid", type=float, default=0.0,
                    help="weight of the per-token perception loss read from the residual stream entering --mid-layer "
                    "(whole-clip regime), so the keys there can carry colour and shape")
    ap.add_argument("--query-aux", type=float, default=0.0,
                    help="weight of a loss that makes the answer position, entering --mid-layer, name what the "
                    "question asks to look for (the subject's shape, the asked colour or corner)")
    ap.add_argument("--mid-layer", type=int, default=2)
    ap.add_argument("--retrieval", type=float, default=0.0,
                    help="weight of the contrastive retrieval loss (regime mukv): the question's query vector must "
                    "score its own scene's blocks above every other block of the batch (mukv.train.retrieval_loss)")
    ap.add_argument("--retrieval-tau", type=float, default=0.1, help="temperature of the retrieval loss")
    ap.add_argument("--kind-weights", default=None,
                    help="draw question kinds in these integer proportions, e.g. event=3,after=3 (others 1)")
    ap.add_argument("--freeze-vision", action="store_true",
                    help="no gradients through the vision tower and projector (once per-token perception is "
                    "learnt; their backward pass is most of a step)")
    ap.add_argument("--attn-heads", type=int, default=2, help="supervised query heads per layer (the first ones)")
    ap.add_argument("--offset-prob", type=float, default=0.5, help="share of (b)/(c) answers moved past the context end")
    ap.add_argument("--max-offset", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0, help="model init and data seed")
    ap.add_argument("--workers", type=int, default=8, help="clip-rendering worker processes")
    ap.add_argument("--device", default=None, help="default: cuda if available")
    ap.add_argument("--no-bf16", action="store_true", help="float32 on CUDA instead of bf16 autocast")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-per-kind", type=int, default=100, help="held-out clips per kind at the end (0: none)")
    ap.add_argument("--eval-seed", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=0, help="quick probe (10 clips per kind) every this many steps")
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--export", default=None, help="write the shippable bf16 checkpoint here")
    ap.add_argument("--eval-only", action="store_true", help="no training: evaluate --model (an exported checkpoint)")
    ap.add_argument("--model", default=None, help="with --eval-only: checkpoint directory (default: the shipped one)")
    ap.add_argument("--session", default="", help="with --eval-only: also evaluate through mukv.Session per clip with "
                    "these policies, comma-separated (e.g. mukv,full_context)")
    ap.add_argument("--sessions-only", action="store_true",
                    help="with --eval-only and --session: skip the batched regimes (e.g. to compare KV codecs)")
    ap.add_argument("--session-config", default=None, metavar="JSON",
                    help="with --session: configuration fields applied over each policy, e.g. "
                    '\'{"kv_codec": "int4"}\' (a KV codec)')
    ap.add_argument("--attention-report", type=int, default=0, metavar="N",
                    help="with --eval-only: where the answer position looks (evidence / other objects of the scene / "
                    "objects of other scenes), per kind and layer, on N held-out clips per kind")
    ap.add_argument("--check-attention", action="store_true",
                    help="first compare gradients of the lower-right causal attention with the masked reference")
    return ap.parse_args(argv)


def check_attention(device: torch.device) -> None:
    """Gradients of mukv's causal_attention against the explicit-mask reference (bf16 and fp32)."""
    from mukv.model import _masked_attention, causal_attention

    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(3, 8, 50, 32, generator=g).to(device, dtype).requires_grad_()
        k = torch.randn(3, 2, 61, 32, generator=g).to(device, dtype).requires_grad_()
        v = torch.randn(3, 2, 61, 32, generator=g).to(device, dtype).requires_grad_()
        w = torch.randn(3, 8, 50, 32, generator=g).to(device, dtype)
        outs = []
        for fn in (causal_attention, _masked_attention):
            for t in (q, k, v):
                t.grad = None
            o = fn(q, k, v, None)
            (o.float() * w.float()).sum().backward()
            outs.append([o.detach().float()] + [t.grad.detach().float().clone() for t in (q, k, v)])
        errs = [float((a - b).norm() / b.norm()) for a, b in zip(*outs)]
        print(f"attention check {dtype}: rel err out/dq/dk/dv = " + ", ".join(f"{e:.2e}" for e in errs), flush=True)


def eval_only(args: argparse.Namespace, device: torch.device) -> int:
    """Evaluate an exported checkpoint: batched regimes, then (optionally) mukv.Session per clip."""
    from mukv import train as T
    from mukv.plugins.models.llava_onevision import LlavaOnevisionAdapter
    from mukv.plugins.models.mukv_tiny import asset_dir

    path = Path(args.model) if args.model else asset_dir()
    adapter = LlavaOnevisionAdapter.from_pretrained(path, device=device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clips = T.eval_clips(args.eval_seed, args.eval_per_kind, num_frames=args.frames)
    result = {}
    if not (args.sessions_only and args.session):
        t0 = time.perf_counter()
        reports = T.evaluate(adapter, clips, T.config_for(adapter), batch=args.eval_batch)
        print(f"{path}: {len(clips)} held-out clips (seed {args.eval_seed}), batched regimes in "
              f"{time.perf_counter() - t0:.0f} s on {device}", flush=True)
        print(T.format_report(reports), flush=True)
        result["batched"] = reports
    session = {}
    extra = {}
    if args.session_config:
        try:
            extra = {"config": json.loads(args.session_config)}
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--session-config is not JSON: {exc}") from None
    for policy in [p for p in args.session.split(",") if p]:
        t0 = time.perf_counter()
        report, rows = T.session_accuracy(adapter, clips, policy=policy, device=device, **extra)
        dt = time.perf_counter() - t0
        key = f"session:{policy}" + (f" {args.session_config}" if args.session_config else "")
        session[key] = report
        result[key] = {"report": report, "rows": rows, "seconds": dt}
        print(f"session policy {policy}: {100 * report['overall']:.1f}% in {dt:.0f} s "
              f"({dt / len(clips):.2f} s per clip: session, feed, ask)", flush=True)
    if session:
        print(T.format_report(session), flush=True)
    if args.attention_report:
        report = T.attention_report(adapter, T.eval_clips(args.eval_seed, args.attention_report,
                                                          num_frames=args.frames))
        result["attention"] = report
        print("attention of the answer position (whole clip), best head of each layer: "
              "share on evidence / other objects of the scene / objects of other scenes", flush=True)
        for kind, by_target in report.items():
            ev = np.asarray(by_target["evidence"])
            best = ev.argmax(1)
            cells = [f"L{y}h{h}: " + " / ".join(f"{np.asarray(by_target[t])[y, h]:.2f}" for t in T.ATTENTION_TARGETS)
                     for y, h in enumerate(best)]
            print(f"  {kind:13s} " + "  ".join(cells), flush=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from mukv import train as T

    import os

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # data parallelism under torchrun: one process per GPU, gradients averaged every step
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        if args.eval_only:
            raise SystemExit("--eval-only runs in one process; start it without torchrun")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.check_attention:
        check_attention(device)
    if args.eval_only:
        return eval_only(args, device)
    def parse_weights(text: str) -> dict[str, float]:
        return {k: float(v) for k, v in (kv.split("=") for kv in text.split(","))}

    weights = parse_weights(args.weights)
    kinds = None
    if args.kind_weights:
        from mukv.bench import KINDS

        kw = {k: int(v) for k, v in parse_weights(args.kind_weights).items()}
        unknown = sorted(set(kw) - set(KINDS))
        if unknown or any(v < 0 for v in kw.values()):
            raise SystemExit(f"--kind-weights: kinds must be among {list(KINDS)} with weights >= 0; got {kw}")
        kinds = tuple(k for k in KINDS for _ in range(kw.get(k, 1)))
    stage1_weights = parse_weights(args.stage1_weights) if args.stage1_weights else weights
    cfg = T.TrainConfig(shape=args.shape, seed=args.seed, steps=args.steps, batch=args.batch, frames=args.frames,
                        max_questions=args.max_questions, single=args.single, plain=args.plain, lr=args.lr, warmup=args.warmup,
                        weight_decay=args.weight_decay, weights=dict(weights), vis_rms=args.vis_rms, aux=args.aux,
                        aux_lm=args.aux_lm, attn_sup=args.attn_sup,
                        attn_layers=tuple(int(x) for x in args.attn_layers.split(",") if x),
                        attn_heads=args.attn_heads, aux_mid=args.aux_mid, query_aux=args.query_aux,
                        mid_layer=args.mid_layer, freeze_vision=args.freeze_vision, retrieval=args.retrieval,
                        retrieval_tau=args.retrieval_tau, offset_prob=args.offset_prob,
                        max_offset=args.max_offset, bf16=not args.no_bf16, workers=args.workers)
    adapter = T.build_model(args.shape, seed=args.seed, device=device, dtype=torch.float32)
    config = T.config_for(adapter)
    params = T.count_parameters(adapter.model)
    print(f"model {args.shape}: {params} parameters; grid {adapter.grid}; device {device}"
          + (f"; data-parallel rank {rank} of {world}" if world > 1 else ""), flush=True)
    if args.init and args.resume:
        raise SystemExit("--init starts a run from exported weights; --resume continues one: give one of them")
    if args.init:
        n = T.load_weights(adapter, args.init)
        print(f"initialised {n} tensors from {args.init}", flush=True)
    trainer = T.Trainer(adapter, cfg, config)
    if args.resume:
        state = trainer.load(args.resume)
        saved = state["train_config"]
        for key in ("shape", "seed", "batch", "frames"):
            if saved.get(key) != getattr(cfg, key):
                print(f"warning: resuming with {key}={getattr(cfg, key)} (checkpoint: {saved.get(key)})", flush=True)
        if args.restart_schedule:
            cfg.schedule_start = trainer.step
        else:
            cfg.schedule_start = int(saved.get("schedule_start", 0))
        print(f"resumed from {args.resume} at step {trainer.step}; LR schedule from step {cfg.schedule_start} "
              f"to {cfg.steps}", flush=True)
    T.training_mode(adapter, True)
    label_grid = adapter.grid[0] if args.aux > 0 or args.aux_lm > 0 or args.aux_mid > 0 else None
    evidence_grid = adapter.grid[0] if args.attn_sup > 0 else None
    dataset = T.TrainingClips(args.seed, 10**9, label_grid=label_grid, evidence_grid=evidence_grid, query_labels=args.query_aux > 0,
                              num_frames=args.frames,
                              max_questions=args.max_questions, single=args.single, plain=args.plain,
                              extra=args.extra_questions, kinds=kinds, fillers=args.fillers,
                              max_filler=args.max_filler, hard_negatives=args.hard_negatives)

    def curriculum():
        if trainer.step < args.stage1_steps:
            cfg.weights = dict(stage1_weights)
            first = T.TrainingClips(args.seed, 10**9, label_grid=label_grid, evidence_grid=evidence_grid, query_labels=args.query_aux > 0,
                                    num_frames=args.stage1_frames,
                                    max_questions=args.max_questions, single=args.single,
                                    plain=args.stage1_plain, extra=args.extra_questions, kinds=kinds)
            for b in T.iterate_batches(first, args.stage1_batch or args.batch, trainer.samples, args.workers,
                                       rank, world):
                yield b
                if trainer.step >= args.stage1_steps or (
                        args.stage1_seconds is not None and time.perf_counter() - t_start > args.stage1_seconds):
                    break
            print(f"curriculum: stage 2 ({args.frames}-frame clips) from step {trainer.step}", flush=True)
        cfg.weights = dict(weights)
        yield from T.iterate_batches(dataset, args.batch, trainer.samples, args.workers, rank, world)

    batches = curriculum()
    probe = T.eval_clips(args.eval_seed + 1000, 10, num_frames=args.eval_frames) if args.eval_every else None
    t_start = time.perf_counter()
    last_save = t_start
    window = {"t": time.perf_counter(), "clips": 0, "questions": 0, "wait": 0.0, "stats": []}
    first_step = trainer.step
    while trainer.step < cfg.steps:
        stop = args.time_limit is not None and time.perf_counter() - t_start > args.time_limit
        lr = None
        if args.lr_by_time and args.time_limit:
            done = trainer.step - first_step
            frac = min(1.0, (time.perf_counter() - t_start) / args.time_limit)
            lr = cfg.lr * (min(1.0, (done + 1) / cfg.warmup) if done < cfg.warmup else
                           cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
        if world > 1:  # rank 0's clock decides when to stop and the time-based LR, for every rank
            flags = torch.tensor([float(stop), -1.0 if lr is None else lr], dtype=torch.float64, device=device)
            torch.distributed.broadcast(flags, 0)
            stop, lr = bool(flags[0] > 0), (None if flags[1] < 0 else float(flags[1]))
        if stop:
            break
        t0 = time.perf_counter()
        batch = next(batches)
        window["wait"] += time.perf_counter() - t0
        stats = trainer.train_step(batch, lr)
        window["clips"] += batch["frames"].shape[0]
        window["questions"] += len(batch["questions"])
        window["stats"].append(stats)
        if rank == 0 and (trainer.step % args.log_every == 0 or trainer.step == cfg.steps
                          or trainer.step == first_step + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - window["t"]
            n = len(window["stats"])
            keys = {k for s in window["stats"] for k in s}
            mean = {k: sum(s[k] for s in window["stats"] if k in s) / sum(k in s for s in window["stats"])
                    for k in sorted(keys)}
            row = {"step": trainer.step, "time": round(time.perf_counter() - t_start, 1), "lr": stats["lr"],
                   **({"ranks": world} if world > 1 else {}),
                   **{k: round(v, 4) for k, v in mean.items() if k.startswith(("loss", "acc", "grad", "rms", "attn", "ret"))},
                   "clips_s": round(world * window["clips"] / dt, 1),
                   "questions_s": round(world * window["questions"] / dt, 1),
                   "step_s": round(dt / n, 3), "data_wait_s": round(window["wait"] / n, 4)}
            if device.type == "cuda":
                row["mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            trainer.history.append(row)
            print(json.dumps(row), flush=True)
            window = {"t": time.perf_counter(), "clips": 0, "questions": 0, "wait": 0.0, "stats": []}
        if rank == 0 and probe and trainer.step % args.eval_every == 0:
            rep = T.evaluate(adapter, probe, config, batch=args.eval_batch)
            T.training_mode(adapter, True)
            print(json.dumps({"probe_step": trainer.step, **{r: round(v["overall"], 3) for r, v in rep.items()},
                              "by_kind_full": {k: v["accuracy"] for k, v in rep["full"]["by_kind"].items()}}),
                  flush=True)
        if rank == 0 and args.save_every and time.perf_counter() - last_save > args.save_every:
            trainer.save(args.out)
            last_save = time.perf_counter()
    train_s = time.perf_counter() - t_start
    if world > 1:
        torch.distributed.destroy_process_group()
        if rank > 0:  # rank 0 saves, evaluates and exports
            return 0
    print(f"trained steps {first_step}..{trainer.step} in {train_s:.0f} s", flush=True)
    trainer.save(args.out, extra={"train_seconds_this_call": train_s})
    print(f"checkpoint: {args.out}", flush=True)
    T.training_mode(adapter, False)
    if args.eval_per_kind:
        t0 = time.perf_counter()
        clips = T.eval_clips(args.eval_seed, args.eval_per_kind, num_frames=args.eval_frames)
        reports = T.evaluate(adapter, clips, config, batch=args.eval_batch)
        print(f"evaluation of {len(clips)} held-out clips (seed {args.eval_seed}) in {time.perf_counter() - t0:.0f} s",
              flush=True)
        print(T.format_report(reports), flush=True)
        Path(args.out, "eval.json").write_text(json.dumps(reports, indent=1))
    if args.export:
        path = T.export(adapter, args.export)
        print(f"exported {path} ({T.directory_bytes(path) / 2**20:.2f} MiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
