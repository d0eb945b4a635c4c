"""The evaluation harness, end to end on a tiny run (a random model: the figures are meaningless,
the plumbing is what is tested)."""

from __future__ import annotations

import json

import pytest

from mukv.bench.evaluate import main, markdown, mukv_budget, plan_policies
from mukv.config import MukvConfig
from mukv.errors import ConfigError


def test_budget_matches_mukv_defaults():
    assert mukv_budget(MukvConfig(), 196) == 20 * 4 + 32 * 19 + 12 * 627


def test_baselines_get_the_same_budget_in_frames():
    plans = {p.name: p for p in plan_policies(["mukv", "rekv", "uniform", "no_memory", "full_context"], 196)}
    assert plans["rekv"].config.levels[0].top_k == 8212 // 196
    assert plans["uniform"].config.levels[0].top_k == 8212 // 196
    assert plans["no_memory"].config.levels[0].top_k == 0
    assert plans["full_context"].full_context
    # the frame-block baselines share one ingest
    assert plans["uniform"].storage_key() == plans["no_memory"].storage_key()
    assert plans["mukv"].storage_key() != plans["rekv"].storage_key() != plans["uniform"].storage_key()
    more = {p.name: p for p in plan_policies(["frame_topk", "uniform"], 196)}
    assert more["frame_topk"].storage_key() == more["uniform"].storage_key()


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


def test_oracle_blocks_reads_the_scene_widened_to_the_block_grid(tmp_path, tiny_model, monkeypatch):
    """``--oracle-blocks`` feeds each question the frames of the blocks its scene is stored in (the scene
    on the grid of the levels' windows), so a scene shorter than a segment is read from whole segments."""
    from mukv.bench.evaluate import scene_on_grid
    from mukv.train import toy_config

    cfg = toy_config()  # windows of 1, 1 and 4 frames
    assert scene_on_grid(10, 12, cfg, 100) == (8, 12)
    assert scene_on_grid(9, 14, cfg, 100) == (8, 16)
    assert scene_on_grid(8, 12, cfg, 100) == (8, 12)
    assert scene_on_grid(97, 99, cfg, 99) == (96, 99)  # cut at the stream's end
    # the oracles read MuKV's memory whatever policy comes first (here the text-only floor)
    res, _ = run_harness(tmp_path, tiny_model, monkeypatch, "--questions", "2", "--policies", "no_memory",
                         "--oracle", "--oracle-blocks")
    runs = {r["policy"]: r for r in res["runs"]}
    assert set(runs) == {"no_memory", "oracle_scene", "oracle_blocks"} and runs["oracle_blocks"]["questions"] == 2
    assert runs["no_memory"]["retrieved_tokens"] == 0
    assert runs["oracle_scene"]["retrieved_tokens"] > 0 and runs["oracle_scene"]["evidence_share"] == 1.0
    assert res["settings"]["oracle_blocks"] is True
    assert runs["oracle_blocks"]["stored_bytes_per_minute"] is None
    # the widened scene holds the scene: some of what it reads is evidence, and never more than oracle_scene's
    assert 0.0 < runs["oracle_blocks"]["evidence_share"] <= 1.0
    assert runs["oracle_blocks"]["evidence_hit"] == 1.0
    assert "| oracle_blocks |" in markdown(res)
    with pytest.raises(ConfigError, match="reserved"):
        plan_policies(["oracle_blocks"], 49, None, None)


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
    # the fields it names are the training code's (fields added to LevelConfig since take their defaults)
    exported = toy_config().model_dump(mode="json")["levels"]
    assert shipped["levels"] == [{k: lv[k] for k in shipped["levels"][i]} for i, lv in enumerate(exported)]
    assert MukvConfig.build({"levels": shipped["levels"]}).levels == toy_config().levels


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
# ------------------------------------------------------------------ issue 19: numbers that hold
def test_policy_specs_scale_the_budget_and_configs_apply():
    from mukv.bench.plans import parse_policy

    assert parse_policy("rekv@1.5") == ("rekv", 1.5) and parse_policy("mukv") == ("mukv", 1.0)
    for bad in ("rekv@0", "rekv@-1", "re kv", "rekv@x", ""):
        with pytest.raises(ConfigError):
            parse_policy(bad)
    plans = {p.name: p for p in plan_policies(["mukv", "frame_topk", "frame_topk@1.5", "no_memory"], 196,
                                              config={"generation": {"max_new_tokens": 7}},
                                              policy_config={"frame_topk@1.5": {"assembly": {"order": "time"}}})}
    assert plans["frame_topk@1.5x"].budget == round(1.5 * 8212)
    assert plans["frame_topk@1.5x"].config.levels[0].top_k == round(1.5 * 8212) // 196
    assert plans["frame_topk@1.5x"].config.assembly.order == "time"
    assert plans["frame_topk"].config.assembly.order == "level_score"  # the per-policy fields stay there
    assert all(p.config.generation.max_new_tokens == 7 for p in plans.values())  # --config reaches every policy
    assert plans["no_memory"].budget == 0
    with pytest.raises(ConfigError, match="not run"):
        plan_policies(["mukv"], 196, policy_config={"rekv": {}})
    with pytest.raises(ConfigError, match="twice"):
        plan_policies(["mukv", "mukv@1"], 196)


def test_a_scaled_multi_level_policy_reads_its_scaled_budget():
    from mukv.bench.plans import fit_budget

    cfg = MukvConfig()
    assert fit_budget(cfg, mukv_budget(cfg, 196), 196) == cfg
    bigger = fit_budget(cfg, 2 * mukv_budget(cfg, 196), 196)
    assert [lv.top_k for lv in bigger.levels] == [40, 64, 24]


def test_seeds_intervals_budgets_and_provenance(tmp_path, tiny_model, monkeypatch):
    res, out = run_harness(tmp_path, tiny_model, monkeypatch, "--questions", "3", "--seeds", "0", "1",
                           "--policies", "mukv", "frame_topk", "frame_topk@100", "no_memory",
                           "--reference", "frame_topk", "--config", '{"generation": {"max_new_tokens": 5}}')
    s = res["settings"]
    assert s["seeds"] == [0, 1]
    assert {r["seed"] for r in res["records"]} == {0, 1}
    runs = {r["policy"]: r for r in res["runs"]}
    for r in runs.values():
        assert r["questions"] == 6 and r["seeds"] == [0, 1]
        lo, hi = r["accuracy_ci"]
        assert 0.0 <= lo <= r["accuracy"] <= hi <= 1.0
    # every answer's realised tokens are recorded; a policy far off its budget is flagged, the others are not
    assert all(0 <= rec["retrieved_tokens"] < rec["kv_tokens"] for rec in res["records"])
    assert all(rec["retrieved_tokens"] % 49 == 0 for rec in res["records"] if rec["policy"] == "frame_topk")
    assert runs["frame_topk@100x"]["budget_flag"] and runs["frame_topk@100x"]["budget_ratio"] < 0.05
    for r in runs.values():  # early questions of a 1-minute stream see fewer frames than the budget holds
        if r["budget"]:
            assert r["budget_flag"] == (abs(r["budget_ratio"] - 1) > 0.05)
    assert not runs["no_memory"]["budget_flag"] and runs["no_memory"]["retrieved_tokens"] == 0
    assert "†" in markdown(res) and "[" in markdown(res)
    # paired differences from the reference, for every other policy
    assert {d["policy"] for d in res["differences"]} == {"mukv", "frame_topk@100x", "no_memory"}
    prov = s["provenance"]
    assert prov["mukv_version"] and prov["torch"] and prov["transformers"] and prov["device"].startswith("cpu")
    assert len(prov["model"]["checkpoint_sha256"]) == 64
    assert "commit" in prov["git"]
    resolved = s["resolved"]
    assert resolved["mukv"]["config"]["generation"]["max_new_tokens"] == 5
    assert MukvConfig.build(resolved["frame_topk"]["config"]).levels[0].keep_ratio == 1.0
    assert resolved["frame_topk"]["storage_group"] == resolved["no_memory"]["storage_group"]
    assert (out / "accuracy.png").stat().st_size > 1000


def test_harness_runs_on_the_disk_tier_and_removes_its_stores(tmp_path, tiny_model, monkeypatch):
    store = tmp_path / "stores"
    res, _ = run_harness(tmp_path, tiny_model, monkeypatch, "--questions", "2", "--policies", "mukv", "frame_topk",
                         "--backend", "lancedb", "--store-path", str(store),
                         "--backend-options", '{"hot_bytes": 8388608}')
    assert res["settings"]["backend"] == "lancedb"
    from mukv.bench.evaluate import HARNESS_EXACT_ROWS

    # every search on disk exact (reproducible), recorded with the options the user gave
    assert res["settings"]["backend_options"] == {"hot_bytes": 8388608, "cold_exact_rows": HARNESS_EXACT_ROWS}
    assert all(r["ingest_seconds"] > 0 and r["stored_bytes_per_minute"] > 0 for r in res["runs"])
    assert store.is_dir() and not any(store.iterdir())
    (store / "other").write_text("x")
    with pytest.raises(SystemExit, match="must be an empty folder"):
        run_harness(tmp_path / "again", tiny_model, monkeypatch, "--questions", "2", "--policies", "mukv",
                    "--backend", "lancedb", "--store-path", str(store))


def test_bad_harness_arguments_are_refused_before_any_model_loads():
    for argv, msg in ((["--policies", "nope"], "unknown policy|nope"), (["--policies", "rekv@0"], "positive"),
                      (["--config", "{bad"], "invalid JSON"), (["--policy-config", "mukv"], "NAME=JSON"),
                      (["--seeds", "0", "--seed", "1"], None)):
        with pytest.raises(SystemExit) as exc:
            main(["--model", "no-such-model", "--minutes", "1", "--questions", "1", *argv])
        if msg:
            import re

            assert re.search(msg, str(exc.value)), exc.value


def test_retrieval_is_reported_per_level_of_the_memory():
    from types import SimpleNamespace as NS

    from mukv.bench.evaluate import evidence_by_level

    q = NS(evidence_start=10, evidence_end=14)
    blocks = [NS(level="frame", frame_start=11, frame_end=12, tokens=4, layer_share=1.0),
              NS(level="frame", frame_start=20, frame_end=21, tokens=4, layer_share=1.0),
              NS(level="segment", frame_start=0, frame_end=4, tokens=8, layer_share=1.0)]
    assert evidence_by_level(NS(blocks=blocks), q) == {"frame": 0.5, "segment": 0.0}
