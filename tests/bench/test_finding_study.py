"""benchmarks/finding_study.py runs end to end on a short stream (it reads the memory backend's own
buffers, so a change there must not break it silently)."""

from __future__ import annotations

import json

from helpers import load_benchmark


def _script():
    return load_benchmark("finding_study")


def test_the_study_ranks_every_level_by_every_score(tmp_path, capsys):
    out = tmp_path / "study.json"
    assert _script().main(["--minutes", "4", "--questions", "3", "--seed", "0", "--pool", "2",
                           "--confidence", "segment", "--confidence-pool", "2", "--out", str(out)]) == 0
    table = json.loads(out.read_text())["table"]
    levels = {key.split("|")[0] for key in table}
    assert levels == {"patch", "frame", "segment"}
    scores = {key.split("|")[1] for key in table}
    for name in ("cos_final@3", "cos_cboth@3", "cos_white@3", "rekv_all", "maxsim@0", "fusion", "chance",
                 "poolx2", "rerank_allx2", "diverse0.99", "from_frames", "from_frames_diverse0.99",
                 "confidencex2", "confidence_poolx2"):
        assert name in scores, name
    for row in table.values():
        assert 0.0 <= row["reached"] <= 1.0 and 0.0 <= row["share"] <= 1.0 and row["n"] >= 1
    assert "cos_final@3" in capsys.readouterr().out


def test_only_and_no_rerank_keep_the_rows_asked_for(tmp_path):
    out = tmp_path / "study.json"
    assert _script().main(["--minutes", "4", "--questions", "3", "--no-rerank", "--only", "cos_c",
                           "--out", str(out)]) == 0
    scores = {key.split("|")[1] for key in json.loads(out.read_text())["table"]}
    assert {"cos_final@3", "cos_cboth@3", "fusion", "chance"} <= scores
    assert not any(s.startswith(("rekv", "maxsim", "cos_white", "pool", "rerank")) for s in scores)
