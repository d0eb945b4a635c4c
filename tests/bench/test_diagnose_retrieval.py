"""benchmarks/diagnose_retrieval.py runs on the shipped model and reports, per layer, shares in [0, 1]."""

from __future__ import annotations

import json

import pytest

from helpers import load_benchmark


def test_diagnostic_reports_every_layer(tmp_path, capsys):
    from mukv.plugins.models.mukv_tiny import asset_dir

    if not (asset_dir() / "model.safetensors").exists():
        pytest.skip("the mukv-tiny checkpoint is not installed")
    mod = load_benchmark("diagnose_retrieval")
    out = tmp_path / "diag.json"
    assert mod.main(["--minutes", "2", "--questions", "5", "--top-k", "8", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert len(res["layers"]) == 4  # mukv-tiny's language model has 4 layers
    for row in res["layers"].values():
        assert set(row) == {"final token", "mean of tokens", "attention, best head", "attention, heads 0-1"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
    assert 0.0 < res["chance"] < 1.0
    assert "| 3 (last) |" in capsys.readouterr().out
