"""Would kivi4 keep the answers if keys were stored before RoPE? A simulation on mukv-tiny's held-out clips
(issue 20, a direction measured before building it).

kivi4 quantises a segment block's keys per channel over its tokens. Stored keys are rotated by RoPE at
each token's position, so one channel's values turn with position and its range widens. This script
answers the same held-out clips as ``benchmarks/codec_clips.py`` with the memory backend storing bf16/
float32 KV (``kv_codec`` none), and pages every block in through a kivi4 round trip taken on keys
rotated back to position 0 (RoPE undone with the stored positions), then rotated again to their
positions: exactly what a codec storing pre-RoPE keys would return. The plain kivi4 round trip
(on the stored, rotated keys) runs beside it as the control, on the same clips, so the difference is
the rotation's alone.

    OMP_NUM_THREADS=1 python benchmarks/kivi4_prerope.py --out runs/kivi4-prerope

Model: mukv-tiny (trained). 1D RoPE only (mukv-tiny, LLaVA-OneVision); M-RoPE models would undo each
axis's rotation the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codec_clips import compared_row, write_results  # noqa: E402


def roundtrip_view(codec, rotary_emb, pre_rope: bool):
    """A ``load_kv`` replacement: the stored KV through ``codec``'s round trip, keys pre-RoPE or not."""
    from mukv.backends.memory import MemoryBackend
    from mukv.rope import rerotate_rows

    plain = MemoryBackend.load_kv

    def load_kv(self, level, ids):
        kv = plain(self, level, ids)  # [n, Y, 2, H, K, D]
        if not pre_rope:
            return codec.decode_blocks(codec.encode_blocks(kv), kv.device)
        pos = self.positions(level, ids)  # [n, K] (or [K])
        pos = pos.expand(kv.shape[0], -1) if pos.ndim == 1 else pos
        keys = kv[:, :, 0]
        flat = torch.stack([rerotate_rows(rotary_emb, keys[i], -pos[i]) for i in range(kv.shape[0])])
        enc = torch.stack((flat, kv[:, :, 1]), dim=2)
        dec = codec.decode_blocks(codec.encode_blocks(enc), kv.device)
        back = torch.stack([rerotate_rows(rotary_emb, dec[i, :, 0], pos[i]) for i in range(kv.shape[0])])
        return torch.stack((back, dec[:, :, 1]), dim=2)

    return load_kv


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codec", default="kivi4", help="codec setting (name or JSON)")
    ap.add_argument("--per-kind", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--resamples", type=int, default=4000)
    ap.add_argument("--modes", default="none,rotated,pre_rope")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from mukv.backends.memory import MemoryBackend
    from mukv import train as T
    from mukv.kvcodec import build_codec
    from mukv.plugins.models.llava_onevision import LlavaOnevisionAdapter
    from mukv.plugins.models.mukv_tiny import asset_dir

    spec = json.loads(args.codec) if args.codec.startswith("{") else args.codec
    adapter = LlavaOnevisionAdapter.from_pretrained(asset_dir(), device="cpu")
    clips = T.eval_clips(args.seed, args.per_kind)
    codec = build_codec(spec)
    plain = MemoryBackend.load_kv
    results = {}
    try:
        for mode in args.modes.split(","):
            MemoryBackend.load_kv = plain if mode == "none" else roundtrip_view(
                codec, adapter.language_model.rotary_emb, mode == "pre_rope")
            t0 = time.perf_counter()
            report, rows = T.session_accuracy(adapter, clips, policy="mukv", device=torch.device("cpu"))
            results[mode] = {"report": report, "correct": [int(r["correct"]) for r in rows],
                             "seconds": time.perf_counter() - t0}
            print(f"{mode:10s} {100 * report['overall']:.1f}% in {results[mode]['seconds']:.0f} s", flush=True)
    finally:
        MemoryBackend.load_kv = plain
    lines = [f"{len(clips)} held-out clips (seed {args.seed}), mukv-tiny, codec {args.codec}: round trip on the "
             "stored (rotated) keys, or on keys rotated back to position 0 (pre-RoPE)", "",
             "| mode | patch | frame | segment | overall | vs none (95%) | vs rotated (95%) |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [compared_row(name, results, ("none", "rotated"), args.resamples) for name in results]
    write_results(args.out, "prerope", args, results, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
