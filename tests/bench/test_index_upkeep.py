"""benchmarks/index_upkeep.py runs on a small table (its flow, not its figures): the search through the
index and the exact scan measured at each checkpoint, and a fresh training after the last."""

from __future__ import annotations

import json

from helpers import load_benchmark


def test_the_index_and_the_exact_scan_are_measured_at_every_checkpoint(tmp_path):
    mod = load_benchmark("index_upkeep")
    out = tmp_path / "upkeep.json"
    assert mod.main(["--rows", "1500", "3000", "6000", "--dim", "16", "--queries", "5", "--optimize-every", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [c["index"]["rows"] for c in res["checkpoints"]] == [3000, 6000]
    for c in res["checkpoints"]:
        assert c["exact"]["recall_at_20"] >= 0.95  # the exact scan is the reference (up to ties)
        assert 0 <= c["index"]["recall_at_20"] <= 1 and c["index"]["ms_per_search"] > 0
    assert res["fresh_at_last"]["rows"] == 6000 and res["lancedb"]
