"""The rotary embedding of ``fused_llm`` (:func:`mukv.accel.rotate_pair`, compiled) against the memory it
must move (issue 18: the profile's rotary kernels took 40 ms of a 512-frame 0.5B prefill).

For each shape (tokens ``T`` of one level forward, the 0.5B architecture's 14 query and 2 key heads of
64) in bf16 on the GPU, the median time of:

* ``eager``: transformers' arithmetic, uncompiled;
* ``compiled``: what ``fused_llm`` runs, on the strided ``[B, H, T, D]`` views the attention makes
  (``q_proj(x).view(B, T, H, D).transpose(1, 2)``);
* ``compiled_contiguous``: the same compiled function on contiguous ``[B, H, T, D]`` tensors;
* ``kernel``: ``fused_rope``'s Triton kernel (:func:`mukv.kernels.rope.rope`) on the strided views
  (and, apart, at each tile of 16 to 128 tokens and 2, 4 or 8 warps);
* ``copy``: ``clone`` of the same query and key tensors, the memory floor (one read, one write).

Printed as milliseconds of device time (the calls replayed from a CUDA graph, as the ingest's
recorded prefill runs them; a kernel of a few microseconds timed alone mostly measures its launch,
also printed) and GB/s of the bytes a rotary pass must move (queries and keys read and written, cos
and sin read once), with the ratios ``compiled / copy`` and ``kernel / copy`` of device time.

    python benchmarks/rope_bench.py --out runs/rope.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpukit.timing import event_ms, graph_ms, kernel_bench_args, write_result  # noqa: E402 - shared by the GPU benchmarks

from mukv.accel import rotate_pair  # noqa: E402
from mukv.fusions import _compiled  # noqa: E402
from mukv.kernels.rope import rope as rope_kernel  # noqa: E402

#: (label, tokens): one 64-frame chunk at the patch level (256 blocks of 49), the segment level's 20
#: windows of 784, 16 frames at the frame level
SHAPES = (("patch level, 64 frames", 196 * 64), ("segment level, 20 windows", 784 * 20),
          ("frame level, 16 frames", 196 * 16))
HQ, HK, D = 14, 2, 64


def main(argv: list[str] | None = None) -> dict:
    args = kernel_bench_args("rope_bench", __doc__, argv, reps=50)
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "shapes": []}
    rope = _compiled("rope", rotate_pair)
    for label, t in SHAPES:
        g = torch.Generator(device=dev).manual_seed(0)
        xq = torch.randn(1, t, HQ * D, device=dev, generator=g).bfloat16()
        xk = torch.randn(1, t, HK * D, device=dev, generator=g).bfloat16()
        q, k = xq.view(1, t, HQ, D).transpose(1, 2), xk.view(1, t, HK, D).transpose(1, 2)
        qc, kc = q.contiguous(), k.contiguous()
        ang = torch.arange(t, device=dev, dtype=torch.float32)[:, None] * torch.rand(D // 2, device=dev, generator=g)
        ang = torch.cat((ang, ang), dim=-1)[None]
        cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
        paths = {"eager": lambda: rotate_pair(q, k, cos, sin), "compiled": lambda: rope(q, k, cos, sin),
                 "compiled_contiguous": lambda: rope(qc, kc, cos, sin),
                 "kernel": lambda: rope_kernel(q, k, cos, sin), "copy": lambda: (xq.clone(), xk.clone())}
        for fn in paths.values():
            for _ in range(3):
                fn()
        torch.cuda.synchronize()
        moved = 2 * 2 * t * (HQ + HK) * D + 2 * 2 * t * D  # q, k read and written; cos, sin read
        row = {"label": label, "tokens": t}
        for name, fn in paths.items():
            ms = event_ms(fn, args.reps)
            dev_ms = graph_ms(fn, args.reps)  # device time alone: the launches replayed from a CUDA graph
            row[name] = {"ms": ms, "gb_s": moved / ms / 1e6, "graph_ms": dev_ms, "graph_gb_s": moved / dev_ms / 1e6}
        want = rotate_pair(q.float(), k.float(), cos.float(), sin.float())
        for name in ("compiled", "kernel"):
            got = paths[name]()
            row[name + "_rel_err"] = max(((a.float() - b).norm() / b.norm()).item() for a, b in zip(got, want))
            row[name + "_over_copy"] = row[name]["graph_ms"] / row["copy"]["graph_ms"]
        # the kernel's tile (tokens per program) and warps, to choose mukv.kernels.rope.BLOCK_T
        row["kernel_tiles"] = {f"{bt}x{w}": graph_ms(lambda bt=bt, w=w: rope_kernel(q, k, cos, sin, bt, w), args.reps)
                               for bt in (16, 32, 64, 128) for w in (2, 4, 8)}
        res["shapes"].append(row)
        cols = "  ".join(f"{n} {row[n]['graph_ms']:.4f} ms ({row[n]['graph_gb_s']:.0f} GB/s; "
                         f"{row[n]['ms']:.4f} ms with its launch)" for n in paths)
        print(f"{label:28s} T={t:6d}  {cols}  compiled/copy {row['compiled_over_copy']:.2f}  "
              f"kernel/copy {row['kernel_over_copy']:.2f}", flush=True)
        print("    kernel tiles (tokens x warps, ms): " + ", ".join(f"{k} {v:.4f}" for k, v in row["kernel_tiles"].items()),
              flush=True)
    return write_result(args.out, res)


if __name__ == "__main__":
    main()
