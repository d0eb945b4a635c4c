"""benchmarks/profile_ingest.py runs on the CPU with the tiny model (its flow, not its figures): each
profiled step is timed and its stages and kernels written to profile.json."""

from __future__ import annotations

import json

from helpers import load_benchmark


def test_the_profile_of_each_step_is_written(tmp_path):
    mod = load_benchmark("profile_ingest")
    assert mod.main(["--device", "cpu", "--preset", "tiny-llava-ov", "--frames", "4", "--top", "3",
                     "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "profile.json").read_text())
    for step in ("preprocess", "vision", "tower", "ingest"):
        assert res[step]["wall_ms"] > 0
    assert set(res["stages"]) >= {"prefill", "score", "compress", "store"}
    assert mod.gb.kernel_kind("nvjet_sm90_tst_192x192") == "matmul"
    assert mod.gb.kernel_kind("pytorch_flash::flash_fwd_kernel") == "attention"
    assert mod.gb.kernel_kind("swiglu_matmul_kernel") == "matmul"  # fused_mlp's Triton product


def test_accelerations_apply_before_profiling_and_are_recorded(tmp_path):
    mod = load_benchmark("profile_ingest")
    assert mod.main(["--device", "cpu", "--preset", "tiny-llava-ov", "--frames", "4", "--top", "3",
                     "--accel", "fused_vision", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "profile.json").read_text())["accel"] == ["fused_vision"]
