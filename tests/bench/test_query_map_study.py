"""benchmarks/query_map_study.py runs on short streams (its flow, not its figures): streams ingested
once and cached, the identity map measured, a fitted map measured on training and test streams."""

from __future__ import annotations

import json

from helpers import load_benchmark


def test_the_identity_and_each_fitted_map_are_measured_on_train_and_test(tmp_path):
    mod = load_benchmark("query_map_study")
    out = tmp_path / "qmap.json"
    args = ["--model", "tiny-llava-ov", "--train-seeds", "1", "--test-seeds", "2", "--minutes", "4", "--questions", "6",
            "--lams", "0.1", "--steps", "3", "--levels", "frame", "segment", "--cache", str(tmp_path / "c"), "--out", str(out)]
    assert mod.main(args) == 0
    res = json.loads(out.read_text())
    for level in ("frame", "segment"):
        rows = res["levels"][level]
        assert [r["map"] for r in rows] == ["identity", "fitted"] and rows[1]["lam"] == 0.1
        for r in rows:
            for part in ("train", "test"):
                assert 0 <= r[part]["reached"] <= 1 and 0 <= r[part]["share"] <= r[part]["reached"] + 1e-9
    cached = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert cached == ["seed1-4min-6q.pt", "seed2-4min-6q.pt"]
    assert mod.main(args) == 0  # the second run reads the cache
