"""benchmarks/scheduler_bench.py runs end to end on CPU with the tiny model for a few simulated seconds:
both modes (the ingest scheduler, independent sessions) under one load, every figure in the JSON (the
benchmark's flow, not its figures)."""

from __future__ import annotations

import json

from helpers import load_benchmark

PHASE_FIELDS = {"mode", "streams", "frames_received", "frames_stored", "frames_dropped", "lag_p50_s", "lag_p99_s",
                "streams_held", "all_streams_held", "questions", "ttft_p50_ms", "ttft_p99_ms", "batches",
                "batch_frames_mean", "batch_frames_max", "gpu_busy_share", "passed", "fail_reasons"}


def _script():
    return load_benchmark("scheduler_bench")


def test_both_modes_run_the_same_load_and_report_every_field(tmp_path, capsys):
    mod = _script()
    assert mod.main(["--out", str(tmp_path), "--device", "cpu", "--preset", "tiny-llava-ov", "--parts", "streams",
                     "--streams", "2", "--seconds", "3", "--question-start", "1", "--question-every", "1",
                     "--answer-tokens", "2", "--lag-bound", "30", "--ttft-goal", "30", "--no-warm-up"]) == 0
    res = json.loads((tmp_path / "scheduler.json").read_text())
    phases = res["phases"]
    assert [p["mode"] for p in phases] == ["scheduler", "independent"]
    for p in phases:
        assert PHASE_FIELDS <= set(p)
        assert p["streams"] == 2
        assert p["frames_received"] == phases[0]["frames_received"] >= 2  # the same arrivals in both modes
        assert p["frames_stored"] + p["frames_dropped"] == p["frames_received"]
        assert p["batches"] >= 1 and p["questions"] + p["questions_skipped"] >= 1
    assert phases[0]["scheduler_config"]["max_batch_frames"] == 32
    assert set(res["max_streams"]) == {"scheduler", "independent"}
    md = (tmp_path / "scheduler.md").read_text()
    assert "| scheduler | 2 |" in md and "| independent | 2 |" in md
    assert "Largest N held" in capsys.readouterr().out


def test_loads_are_reproducible_and_spread_over_the_period():
    mod = _script()
    a, b = mod.Load(50, 20.0, 0.5, 1.0, 3.0, seed=4), mod.Load(50, 20.0, 0.5, 1.0, 3.0, seed=4)
    assert (a.t == b.t).all() and (a.s == b.s).all() and (a.pick == b.pick).all()
    assert len(a.t) == 500 and (a.t[1:] >= a.t[:-1]).all() and a.t.max() < 20.0  # 10 frames per camera
    for i in range(50):  # each camera every 2 s
        t = a.t[a.s == i]
        assert len(t) == 10 and abs((t[1:] - t[:-1]) - 2.0).max() < 1e-9
    assert list(a.questions) == [float(x) for x in range(3, 20)]


def test_first_token_counts_the_wait_and_not_the_decoding():
    mod = _script()
    # arrived at 10.0, called at 10.5, returned at 11.5 after decoding for 0.8 s whose first token took 0.1 s
    assert abs(mod.answer_ttft(10.5, 10.0, 11.5, {"generate": 0.8, "first_token": 0.1}) - 0.8) < 1e-12
