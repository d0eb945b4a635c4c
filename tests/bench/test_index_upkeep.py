"""benchmarks/index_upkeep.py runs on a small table (its flow, not its figures): both upkeep policies
measured at each checkpoint, mukv's training the index again as the table grows."""

from __future__ import annotations

import json

from helpers import load_benchmark


def test_both_policies_are_measured_at_every_checkpoint(tmp_path):
    mod = load_benchmark("index_upkeep")
    out = tmp_path / "upkeep.json"
    assert mod.main(["--rows", "1500", "3000", "6000", "--dim", "16", "--queries", "5", "--optimize-every", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["policy"] for r in res["runs"]] == ["lance upkeep", "mukv upkeep"]
    for run in res["runs"]:
        assert [c["rows"] for c in run["checkpoints"]] == [3000, 6000]
        assert all(0 <= c["recall_at_20"] <= 1 and c["ms_per_search"] > 0 for c in run["checkpoints"])
    lance, mukv = (len(r["trainings"]) for r in res["runs"])
    assert lance == 1 and mukv >= 2
