"""benchmarks/accel_bench.py runs end to end on CPU with the tiny model (the benchmark's flow, not its
figures): the plain mode is the reference, a mode the device cannot run (FP8 on a CPU) is recorded as
failed with its reason while the others go on, and the tables are written."""

from __future__ import annotations

import json

import pytest

from helpers import load_benchmark


@pytest.mark.slow
def test_modes_run_against_the_plain_path_and_a_mode_that_cannot_run_is_a_row(tmp_path):
    mod = load_benchmark("accel_bench")
    assert mod.main(["--device", "cpu", "--preset", "tiny-llava-ov", "--modes", "plain,fp8_vision,plain,fused_norms+multi_kernel",
                     "--vision-batch", "4", "--chunk", "8", "--frames", "8", "--reps", "1", "--stream-frames", "8",
                     "--questions", "1", "--answer-tokens", "2", "--reference-frames", "2",
                     "--ablate-async-metadata", "--ablate-pinned-frames", "--compare-encode-ahead",
                     "--encode-batch", "4",
                     "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "accel.json").read_text())
    plain, fp8, again, multi = res["modes"]
    assert multi["applied"][-1] == "multi_kernel" and multi["ingest_vision"]["fps"] > 0  # a mode word, not an acceleration
    assert "multi_kernel" not in again["applied"]
    assert plain["mode"] == "plain" and plain["vision"]["fps"] > 0 and plain["ingest_vision"]["fps"] > 0
    assert "agreement" not in plain  # the reference
    assert plain["reference"]["vision"] > 0 and plain["reference"]["no_vision"] > 0  # the authors' path, same run
    assert "reference" not in again
    assert plain["sync_metadata_fps"]["vision"] > 0 and plain["sync_metadata_fps"]["no_vision"] > 0
    assert plain["pageable_frames_fps"] > 0
    ahead = plain["encode_ahead_fps"]
    assert ahead["serial"] > 0 and ahead["ahead"] > 0 and len(ahead["serial_runs"]) == len(ahead["ahead_runs"]) == 1
    assert "FP8" in fp8["error"]
    agree = again["agreement"]  # the plain path against itself: every token kept alike
    assert agree["top1_agreement"] == 1.0 and agree["greedy_agreement"] == 1.0
    assert all(agree[lv]["kept_tokens_same"] == 1.0 for lv in ("patch", "frame", "segment") if agree[lv]["blocks"])
    md = (tmp_path / "accel.md").read_text()
    assert "| plain |" in md and "Reference mode (the authors' path" in md and "pageable memory" in md and "PIN_FRAMES" in md
    assert "mukv.encode_ahead" in md
