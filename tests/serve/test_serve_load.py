"""benchmarks/serve_load.py runs end to end (briefly): its figures are produced as documented."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_serve_load_benchmark_runs(tmp_path):
    bench = runpy.run_path(str(ROOT / "benchmarks" / "serve_load.py"))
    out = tmp_path / "load.json"
    assert bench["main"](["--model", "tiny-llava-ov", "--device", "cpu", "--streams", "2", "--minutes", "1",
                          "--questions", "1", "--speed", "6", "--question-rate", "0.5", "--max-lag", "60",
                          "--store", str(tmp_path / "stores"), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["frames"]["pushed"] == 60 and r["frames"]["stored"] + r["frames"]["dropped"] == 60
    assert r["questions"]["answered"] >= 1 and r["questions"]["first_token_s"]["p50"] > 0
    if r["frames"]["dropped"] == 0:  # the same frames offline: the same answers
        equal, total = map(int, r["accuracy"]["answers_equal_offline"].split("/"))
        assert equal == total
    assert r["memory"]["series"] and out.with_suffix(".md").read_text().startswith("model tiny-llava-ov")
