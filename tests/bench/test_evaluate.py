"""The evaluation harness, end to end on a tiny run (a random model: the figures are meaningless,
the plumbing is what is tested)."""

from __future__ import annotations

import json

from mukv.bench.evaluate import main, markdown, mukv_budget, plan_policies
from mukv.config import MukvConfig


def test_budget_matches_mukv_defaults():
    assert mukv_budget(MukvConfig(), 196) == 20 * 4 + 32 * 19 + 12 * 627


def test_baselines_get_the_same_budget_in_frames():
    plans = {p.name: p for p in plan_policies(["mukv", "rekv", "uniform", "no_memory", "full_context"], 196)}
    assert plans["rekv"].config.levels[0].top_k == 8212 // 196
    assert plans["uniform"].config.levels[0].top_k == 8212 // 196
    assert plans["no_memory"].config.levels[0].top_k == 0
    assert plans["full_context"].full_context
    # the frame-block baselines share one ingest
    assert plans["rekv"].storage_key() == plans["uniform"].storage_key() == plans["no_memory"].storage_key()
    assert plans["mukv"].storage_key() != plans["rekv"].storage_key()


def test_tiny_run_end_to_end(tmp_path, tiny_model, monkeypatch):
    import mukv.session

    monkeypatch.setattr(mukv.session, "load_model", lambda m, d, t: tiny_model)
    out = tmp_path / "eval"
    assert main(["--model", "tiny-llava-ov", "--minutes", "1", "--questions", "3", "--policies", "mukv", "rekv",
                 "no_memory", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    runs = {r["policy"]: r for r in res["runs"]}
    assert set(runs) == {"mukv", "rekv", "no_memory"}
    assert all(r["questions"] == 3 for r in runs.values())
    assert runs["no_memory"]["kv_tokens"] < runs["rekv"]["kv_tokens"]
    assert len(res["records"]) == 9
    assert (out / "accuracy.png").stat().st_size > 1000
    assert "| mukv |" in markdown(res)


def test_too_many_questions_for_the_stream_is_a_clear_error():
    """More questions than a stream length holds is refused before any model loads, in the harness's words."""
    import pytest

    from mukv.bench import evaluate

    with pytest.raises(SystemExit, match=r"--minutes 1 with --questions 11: stream of 1.0 min is too short"):
        evaluate.main(["--model", "no-such-model", "--minutes", "1", "--questions", "11"])
