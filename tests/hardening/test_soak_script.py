"""benchmarks/soak.py runs end to end on CPU for a few seconds (the benchmark's flow, not its figures)."""

from __future__ import annotations

import json
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
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)
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
    if sys.platform.startswith("linux"):
        assert last["glibc_in_use_mib"] > 0 and last["RssAnon_mib"] > 0
