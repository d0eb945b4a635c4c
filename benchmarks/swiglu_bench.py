"""The fused SwiGLU product (``fused_mlp``, :mod:`mukv.kernels.swiglu`) against torch's path (issue 18).

For each shape ``[M tokens, K hidden] -> [M, N intermediate]`` in bf16 on the GPU, the median time of:

* ``torch``: the gate and up products (cuBLAS) and ``fused_llm``'s compiled SwiGLU, what an
  accelerated decoder layer runs without ``fused_mlp``;
* ``joint_gemm``: one cuBLAS product of the joint ``[2N, K]`` weight alone, no activation (the
  matrix product's own cost: what an epilogue fusion could at best come to);
* ``fused``: the Triton kernel (autotuned on its first call, excluded).

Printed as milliseconds and TFLOP/s (``4 M K N`` FLOP per call) with the ratios ``torch / fused``.

    python benchmarks/swiglu_bench.py --out runs/swiglu.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpukit.timing import event_ms, kernel_bench_args, write_result  # noqa: E402 - shared by the GPU benchmarks

from mukv.accel import _compiled, swiglu  # noqa: E402
from mukv.kernels import swiglu as sk  # noqa: E402

#: (label, M tokens, K hidden, N intermediate): the tokens of one 64-frame chunk at the 0.5B patch level
#: (256 blocks of 49), of the segment level's 20 windows (784 tokens each), of 16 frames at the frame
#: level, and 16 frames at 7B
SHAPES = (("0.5B patch level, 64 frames", 196 * 64, 896, 4864), ("0.5B segment level, 20 windows", 784 * 20, 896, 4864),
          ("0.5B frame level, 16 frames", 196 * 16, 896, 4864), ("7B patch level, 16 frames", 196 * 16, 3584, 18944))


def main(argv: list[str] | None = None) -> dict:
    args = kernel_bench_args("swiglu_bench", __doc__, argv, reps=30)
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "shapes": []}
    act = _compiled("swiglu", swiglu)
    for label, m, k, n in SHAPES:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(m, k, device=dev, generator=g).bfloat16()
        wg = (torch.randn(n, k, device=dev, generator=g) / k ** 0.5).bfloat16()
        wu = (torch.randn(n, k, device=dev, generator=g) / k ** 0.5).bfloat16()
        joint = sk.interleave(wg, wu)
        paths = {"torch": lambda: act(torch.nn.functional.linear(x, wg), torch.nn.functional.linear(x, wu)),
                 "joint_gemm": lambda: torch.nn.functional.linear(x, joint),
                 "fused": lambda: sk.swiglu_matmul(x, joint)}
        for fn in paths.values():  # compile, autotune, warm
            for _ in range(3):
                fn()
        torch.cuda.synchronize()
        flop = 4 * m * k * n
        row = {"label": label, "m": m, "k": k, "n": n}
        for name, fn in paths.items():
            ms = event_ms(fn, args.reps)
            row[name] = {"ms": ms, "tflops": flop / ms / 1e9}
        exact = sk.swiglu_reference(x.float(), joint.float())
        row["fused_rel_err"] = ((paths["fused"]().float() - exact).norm() / exact.norm()).item()
        row["torch_rel_err"] = ((paths["torch"]().float() - exact).norm() / exact.norm()).item()
        row["torch_over_fused"] = row["torch"]["ms"] / row["fused"]["ms"]
        res["shapes"].append(row)
        print(f"{label:26s} torch {row['torch']['ms']:.3f} ms ({row['torch']['tflops']:.0f} TFLOP/s)  joint GEMM "
              f"{row['joint_gemm']['ms']:.3f} ms ({row['joint_gemm']['tflops']:.0f})  "
              f"fused {row['fused']['ms']:.3f} ms "
              f"({row['fused']['tflops']:.0f})  torch/fused {row['torch_over_fused']:.2f}x  rel err fused "
              f"{row['fused_rel_err']:.4f} torch {row['torch_rel_err']:.4f}", flush=True)
    return write_result(args.out, res)


if __name__ == "__main__":
    main()
