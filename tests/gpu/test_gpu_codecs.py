"""On a GPU: KV codecs encode and decode the same bytes and values on the GPU as on the CPU, and the disk tier
pages in encoded bytes and decodes them on the device (issue 20).

Run through the device tool (skipped without CUDA)::

    python -m pytest -q tests/gpu/test_gpu_codecs.py

``MUKV_GPU_TEST_DEVICE=cpu`` runs the same checks on the CPU, to check the tests themselves.

* every codec and KV dtype: rows encoded on the GPU are bit for bit the rows encoded on the CPU, and rows
  decoded on the GPU are bit for bit the values decoded on the CPU (the decode arithmetic rounds once, so a
  fused multiply-add or not gives the same);
* the disk tier on the device with int4 and kivi4, a hot tier far smaller than the stream, decoded or encoded hot
  blocks: every block reads back as the CPU round trip of what was stored; page-in counts stored and
  decoded bytes.
"""

from __future__ import annotations

import os

import pytest
import torch

from mukv.kvcodec import build_codec

DEVICE = torch.device(os.environ.get("MUKV_GPU_TEST_DEVICE", "cuda"))
CUDA = DEVICE.type == "cuda"
pytestmark = ([pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
              if CUDA else [])

# kivi4 on blocks of 19 tokens: short blocks (per token, values across heads) by default; long ones (per
# channel) with channel_tokens 16, with and without values per channel; rotated per-token groups; the encoder's
# range search (the same choice on every device: float64 sums of the candidates' errors)
CODECS = ["none", "int8", "int4", {"name": "int4", "group_size": 32}, "kivi4", {"name": "kivi4", "channel_tokens": 16},
          {"name": "kivi4", "channel_tokens": 16, "channel_values": False, "rotate": True},
          {"name": "kivi4", "rotate": True}, {"name": "kivi4", "range_search": True},
          {"name": "kivi4", "channel_tokens": 16, "range_search": True},
          {"name": "kivi4", "key_bits": 6}, {"name": "kivi4", "channel_tokens": 16, "key_bits": 6},
          *(["fp8"] if hasattr(torch, "float8_e4m3fn") else [])]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _kv(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """[B, Y, 2, H, K, D] KV with outlier channels and tokens, zeros and tiny values (as tests/test_codecs.py)."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(5, 4, 2, 2, 19, 64, generator=g)
    kv[:, :, 0, :, :, 3] *= 40.0
    kv[:, :, 1, :, 2, :] *= 30.0
    kv[1] = 0.0
    kv[2, 0] *= 1e-4
    return kv.to(dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.dtype != torch.uint8 else t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", CODECS, ids=str)
def test_gpu_and_cpu_agree_bit_for_bit(spec, dtype):
    codec = build_codec(spec)
    kv = _kv(dtype)
    on_cpu = codec.encode_blocks(kv)
    on_gpu = codec.encode_blocks(kv.to(DEVICE))
    assert on_gpu.rows.device.type == DEVICE.type
    assert torch.equal(_bytes(on_gpu.rows).cpu(), _bytes(on_cpu.rows))  # the same stored bytes
    dec_cpu = codec.decode_blocks(on_cpu, "cpu")
    dec_gpu = codec.decode_blocks(on_cpu, DEVICE)  # CPU rows decoded on the device (what page-in does)
    assert dec_gpu.device.type == DEVICE.type and dec_gpu.dtype == dtype
    assert torch.equal(dec_gpu.cpu().view(torch.uint8), dec_cpu.view(torch.uint8))


@pytest.mark.parametrize("spec", ["int4", {"name": "kivi4", "channel_tokens": 16}], ids=str)
@pytest.mark.parametrize("hot_encoded", [False, True])
def test_disk_tier_decodes_on_the_device(tmp_path, hot_encoded, spec):
    pytest.importorskip("lancedb")
    pytest.importorskip("zarr")
    from mukv.backends.disk import TieredBackend
    from mukv.blocks import CompressedBlocks, KVLayout

    layout = KVLayout(4, 2, 64, torch.bfloat16, "gpu-codec-test")
    codec = build_codec(spec)
    b = TieredBackend(layout, str(tmp_path / "st"), DEVICE, stream_id="s", codec=codec, hot_bytes=256 << 10,
                      hot_slab_bytes=64 << 10, commit_interval=0.05, hot_encoded=hot_encoded)
    stored = []
    for i in range(12):
        kv = _kv(torch.bfloat16, seed=i)  # 5 blocks of K = 19, 0.37 MiB of bf16
        stored.append(kv)
        idx = torch.arange(19).expand(5, 19)
        fs = torch.arange(5 * i, 5 * i + 5)
        b.add(CompressedBlocks("frame", kv.to(DEVICE), torch.randn(5, 128), idx, idx, fs, fs + 1, fs.double(),
                               fs.double(), idx))
    b.flush()
    want = codec.decode_blocks(codec.encode_blocks(torch.cat(stored)), "cpu")
    ids = torch.randperm(60)
    for _ in range(2):  # mostly from disk, then partly promoted
        got = b.load_kv("frame", ids)
        assert got.device.type == DEVICE.type
        assert torch.equal(got.cpu(), want[ids])
    p = b.tier_stats()["pagein"]
    assert p["blocks_disk"] > 0 and p["bytes_disk"] < p["bytes_decoded"]
    b.close()
