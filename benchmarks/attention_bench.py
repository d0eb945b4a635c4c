"""Attention kernels at the ingest's shapes, per sdpa backend (issue 18: where the attention time goes).

Shapes of llava-onevision-qwen2-0.5b-ov in bf16: the vision tower (SigLIP: a batch of frames, 16 heads,
729 tokens, head dim 72, no mask) and the language model's level prefill (14 query heads over 2 KV
heads, head dim 64, a block of 196 or 784 tokens after a system prompt, causal aligned to the end as
:func:`mukv.attention.causal_attention` runs it). For each, the median time and TFLOP/s under torch's
default choice and under each backend forced (flash, memory-efficient, cuDNN); a backend that
refuses the shape is listed with its error.

    python benchmarks/attention_bench.py --out runs/attention.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpukit.timing import event_ms, kernel_bench_args, write_result  # noqa: E402 - shared by the GPU benchmarks

#: (label, batch, query heads, KV heads, query tokens, key tokens, head dim, lower-right causal)
SHAPES = (("vision, 32 frames", 32, 16, 16, 729, 729, 72, False),
          ("prefill patch, 64 blocks", 64, 14, 2, 196, 196 + 24, 64, True),
          ("prefill segment, 20 blocks", 20, 14, 2, 784, 784 + 24, 64, True))


def main(argv: list[str] | None = None) -> dict:
    args = kernel_bench_args("attention_bench", __doc__, argv, reps=20)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    dev = torch.device("cuda")
    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}
    res = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "shapes": []}
    for label, b, hq, hk, lq, lk, d, causal in SHAPES:
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(b, hq, lq, d, device=dev, generator=g).bfloat16()
        k = torch.randn(b, hk, lk, d, device=dev, generator=g).bfloat16()
        v = torch.randn(b, hk, lk, d, device=dev, generator=g).bfloat16()
        mask = causal_lower_right(lq, lk) if causal else None
        flop = 4 * b * hq * lq * lk * d * (0.5 if causal else 1.0)  # about half the pairs under a causal mask
        row = {"label": label, "shape": [b, hq, hk, lq, lk, d], "causal": causal}

        def run():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=hq != hk)

        want = None
        for name, backend in backends.items():
            try:
                if backend is None:
                    fn = run
                else:
                    def fn(backend=backend):
                        with sdpa_kernel([backend]):
                            return run()
                out = fn()
                torch.cuda.synchronize()
                want = out.float() if want is None else want
                ms = event_ms(fn, args.reps)
                row[name] = {"ms": ms, "tflops": flop / ms / 1e9,
                             "rel_err_vs_default": ((out.float() - want).norm() / want.norm()).item()}
            except RuntimeError as e:
                row[name] = {"error": str(e).splitlines()[0][:200]}
        res["shapes"].append(row)
        print(label, {n: (f"{r['ms']:.3f} ms {r['tflops']:.0f} TFLOP/s" if "ms" in r else r["error"][:80])
                      for n, r in row.items() if isinstance(r, dict)}, flush=True)
    return write_result(args.out, res)


if __name__ == "__main__":
    main()
