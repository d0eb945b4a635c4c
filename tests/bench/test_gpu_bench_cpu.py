"""``benchmarks/gpu_bench.py`` end to end on the CPU (its own check mode: the tiny model, ``--quick``), so
the script and its shared parts (``benchmarks/gpukit/``) keep running between GPU sessions. The figures
of a CPU run mean nothing; the test checks what the run writes."""

from __future__ import annotations

import json

from helpers import load_benchmark


def test_the_cpu_check_of_gpu_bench_writes_every_table(tmp_path):
    gb = load_benchmark("gpu_bench")
    assert gb.main(["--device", "cpu", "--presets", "tiny-llava", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    m = res["models"]["tiny-llava-ov"]
    ing = m["ingest"]
    for key in ("fast_no_vision", "fast_vision", "ref_no_vision", "ref_vision"):
        assert ing[key]["fps"] > 0, key
    assert set(ing["stages_no_vision"]) >= {"prefill", "other"}
    assert m["flops"]["per_frame"] > 0 and m["flops"]["vision_per_frame"] > 0
    assert set(m["questions"]) == {"1 h", "100 h"}
    for label, q in m["questions"].items():
        assert "error" not in q, (label, q)
        assert q["ttft_ask"] > 0 and q["kv_tokens"] > 0 and q["ref"]["ttft"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "### Ingest" in md and "### Questions" in md and "tiny-llava-ov" in md


def test_the_shared_parts_are_reached_through_gpu_bench_as_the_scripts_beside_it_use_them():
    gb = load_benchmark("gpu_bench")
    for name in ("QUESTIONS", "build", "datasheet_bf16_tflops", "encode_pool", "event_ms", "fast_ingest", "free",
                 "kernel_bench_args", "kernel_kind", "measure_ceilings", "median", "prefill_flops",
                 "random_frames", "ref_ingest", "sync", "timed", "vision_flops", "write_result"):
        assert hasattr(gb, name), name
    assert gb.datasheet_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gb.datasheet_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert gb.datasheet_bf16_tflops("a card nobody knows") is None
