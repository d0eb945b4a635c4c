"""The evaluation harness, end to end on a tiny run (a random model: the figures are meaningless,
the plumbing is what is tested)."""

from __future__ import annotations

import json

import pytest

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


def run_harness(tmp_path, model, monkeypatch, *args: str) -> tuple[dict, object]:
    """Run the harness's command line on ``model`` (a loaded adapter); its results and output folder."""
    import mukv.session

    monkeypatch.setattr(mukv.session, "load_model", lambda m, d, t: model)
    out = tmp_path / "eval"
    assert main(["--model", "tiny-llava-ov", "--minutes", "1", *args, "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text()), out


def test_tiny_run_end_to_end(tmp_path, tiny_model, monkeypatch):
    res, out = run_harness(tmp_path, tiny_model, monkeypatch, "--questions", "3", "--policies", "mukv", "rekv",
                           "no_memory")
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


def test_budget_and_levels_follow_the_model_defaults():
    """A model whose checkpoint carries its own levels (mukv-tiny: 7/49/196-token blocks at 49
    tokens per frame) sets the shared budget, and MuKV's variants run at those levels."""
    from mukv.train import toy_config

    levels = toy_config().model_dump(mode="json")["levels"]
    plans = {p.name: p for p in plan_policies(["mukv", "mukv_timeline", "rekv"], 49, None, {"levels": levels})}
    assert plans["mukv"].config.levels == plans["mukv_timeline"].config.levels == toy_config().levels
    assert plans["mukv_timeline"].config.assembly.rerotate
    budget = mukv_budget(toy_config(), 49)
    assert budget == 20 * 2 + 32 * 4 + 4 * 156  # 4 segments: mukv-tiny's own top-k
    assert plans["rekv"].config.levels[0].top_k == budget // 49


def test_evidence_share_counts_tokens_in_the_questioned_scene():
    from types import SimpleNamespace as NS

    from mukv.bench.evaluate import evidence_share

    q = NS(evidence_start=10, evidence_end=14)
    blocks = [NS(frame_start=9, frame_end=10, tokens=5), NS(frame_start=12, frame_end=13, tokens=3),
              NS(frame_start=13, frame_end=17, tokens=2)]
    assert evidence_share(NS(blocks=blocks), q) == 0.5
    assert evidence_share(NS(blocks=[]), q) == 0.0


def test_oracle_row_answers_from_the_scene_alone(tmp_path, tiny_model, monkeypatch):
    res, _ = run_harness(tmp_path, tiny_model, monkeypatch, "--questions", "2", "--policies", "mukv", "rekv",
                         "--oracle")
    runs = {r["policy"]: r for r in res["runs"]}
    assert set(runs) == {"mukv", "rekv", "oracle_scene"} and runs["oracle_scene"]["questions"] == 2
    # fed only its scene, every retrieved token is evidence
    assert runs["oracle_scene"]["evidence_share"] == 1.0
    assert all(0.0 <= r["evidence_share"] <= 1.0 for r in runs.values())
    assert "| oracle_scene |" in markdown(res)


def test_shipped_model_carries_the_levels_its_training_code_exports():
    """mukv/assets/mukv-tiny/mukv_config.json is what mukv.train.export writes for the shape
    (toy_config: four segments retrieved), so a re-export does not silently change the budget."""
    from pathlib import Path

    import mukv
    from mukv.model import read_model_defaults
    from mukv.train import toy_config

    shipped = read_model_defaults(Path(mukv.__file__).parent / "assets" / "mukv-tiny")
    assert shipped["levels"] == toy_config().model_dump(mode="json")["levels"]


def test_top_k_overrides_mukv_levels_and_the_budget_follows():
    from mukv.bench.evaluate import with_top_k
    from mukv.errors import ConfigError
    from mukv.train import toy_config

    defaults = {"levels": toy_config().model_dump(mode="json")["levels"]}
    two = with_top_k(defaults, {"segment": 2})
    assert [lv["top_k"] for lv in two["levels"]] == [20, 32, 2]
    assert [lv["top_k"] for lv in defaults["levels"]] == [20, 32, 4]  # the model's own are not changed
    assert mukv_budget(MukvConfig.build(two), 49) == 20 * 2 + 32 * 4 + 2 * 156
    plans = {p.name: p for p in plan_policies(["mukv", "rekv"], 49, None, two)}
    assert plans["mukv"].config.levels[2].top_k == 2
    assert plans["rekv"].config.levels[0].top_k == (20 * 2 + 32 * 4 + 2 * 156) // 49
    assert with_top_k(defaults, None) is defaults
    with pytest.raises(ConfigError, match=r"unknown level\(s\) \['scene'\]"):
        with_top_k(defaults, {"scene": 1})
    with pytest.raises(ConfigError, match="must be >= 0"):
        with_top_k(defaults, {"frame": -1})
    with pytest.raises(SystemExit, match="LEVEL=K pairs"):
        main(["--top-k", "segment", "--minutes", "1", "--questions", "1"])


def test_every_policy_stores_through_the_kv_codec(tmp_path, tiny_model, monkeypatch):
    """``--kv-codec`` reaches every policy's session (and the oracle's); a bad codec is refused before any model
    loads."""
    import mukv.session
    from mukv.bench import evaluate

    seen = []
    original = mukv.session.Session.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self.codec.record())

    monkeypatch.setattr(mukv.session.Session, "__init__", spy)
    res, _ = run_harness(tmp_path, tiny_model, monkeypatch, "--questions", "2", "--policies", "mukv", "rekv",
                         "--oracle", "--kv-codec", '{"name": "int4", "group_size": 8}')
    assert res["settings"]["kv_codec"] == {"name": "int4", "group_size": 8}
    assert seen and all(r == {"name": "int4", "version": 1, "settings": {"group_size": 8}} for r in seen)
    plain, _ = run_harness(tmp_path / "plain", tiny_model, monkeypatch, "--questions", "2", "--policies", "mukv")
    stored = {r["policy"]: r["stored_bytes_per_minute"] for r in res["runs"] if "accuracy" in r}
    assert stored["mukv"] < 0.5 * plain["runs"][0]["stored_bytes_per_minute"]
    with pytest.raises(SystemExit, match="unknown KV codec 'int3'"):
        evaluate.main(["--model", "no-such-model", "--minutes", "1", "--questions", "2", "--kv-codec", "int3"])
