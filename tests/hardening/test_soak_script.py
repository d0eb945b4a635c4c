"""benchmarks/soak.py runs end to end on CPU for a few seconds (the benchmark's flow, not its figures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lancedb", reason="the soak's disk streams need lancedb (pip install mukv[disk])")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def test_soak_answers_every_question_verifies_the_store_and_records_memory_parts(tmp_path):
    out = tmp_path / "soak.json"
    args = [sys.executable, str(SCRIPT), "--seconds", "4", "--memory-streams", "1", "--disk-streams", "1",
            "--sample-every", "1", "--grace", "60", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "MUKV_MALLOC_ARENA_MAX")}
    run = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    v = res["verdicts"]
    assert v["every_question_answered"] and v["hot_tier_within_budget"] and v["nothing_lost"]
    assert res["verify"]["ok"]
    asked = sum(k["asked"] for k in res["per_kind"].values())
    assert asked > 0 and asked == sum(k["answered"] for k in res["per_kind"].values())
    last = res["samples"][-1]
    assert last["frames"] > 0 and last["rss_mib"] > 0
    assert last["row_cache_rows"] >= 0 and last["lance_cache_mib"] >= 0
    assert isinstance(v["rss_unbounded_growth_mib"], float) and v["gpu_floor_growth_mib"] is None  # CPU run
    if sys.platform.startswith("linux"):
        assert last["glibc_in_use_mib"] > 0 and last["RssAnon_mib"] > 0
        # import mukv capped glibc's arenas before the streams', lance's and torch's threads took theirs
        assert res["machine"]["malloc_arena_max"] == "2 (import mukv)"
        assert 1 <= last["malloc_arenas"] <= 2


def test_rescore_reads_saved_results_and_names_a_bad_file(tmp_path, capsys):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import soak
    finally:
        sys.path.remove(str(SCRIPT.parent))
    row = {"rss_mib": 100.0, "held_mib": 0.0, "pinned_mib": 0.0, "lance_cache_mib": 0.0, "hot_over_budget": 0}
    flat = [dict(row) for _ in range(9)]
    # the raw RSS grows 75 MiB from the middle third to the last, all of it lance's caches filling: bounded; the same growth unexplained: not
    filling = [dict(row, rss_mib=100.0 + 25 * i, lance_cache_mib=25.0 * i) for i in range(9)]
    leaking = [dict(row, rss_mib=100.0 + 25 * i) for i in range(9)]
    paths = []
    for name, samples in (("flat", flat), ("filling", filling), ("leaking", leaking)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps({"samples": samples}))
    assert soak.rescore([str(p) for p in paths], 64) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("bounded: True") and "+0 MiB" in out[0]
    assert "RSS beyond held blocks +75 MiB" in out[1] and out[1].endswith("bounded: True")
    assert out[2].endswith("bounded: False")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert soak.rescore([str(bad)], 64) == 2
    assert "bad.json: not a soak result" in capsys.readouterr().err


def test_lance_call_timeout_benchmark_runs():
    script = SCRIPT.parent / "lance_call_timeout.py"
    run = subprocess.run([sys.executable, str(script), "--searches", "3", "--rounds", "1"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "off" in run.stdout and "on" in run.stdout and " ms" in run.stdout
