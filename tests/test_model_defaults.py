"""A checkpoint's own configuration (mukv_config.json): read, validated, and applied by Session
under the policy's and the caller's fields, never over a stored stream's."""

from __future__ import annotations

import json

import pytest
import mukv
from mukv.config import MukvConfig
from mukv.errors import ConfigError
from mukv.model import MODEL_DEFAULTS_FILE, read_model_defaults
from mukv.train import toy_config

#: Levels of a 7x7 grid (one-row patches), as a checkpoint of that shape would carry them.
TOY_LEVELS = toy_config().model_dump(mode="json")["levels"]


def test_no_file_means_no_defaults(tmp_path):
    assert read_model_defaults(tmp_path) == {}


@pytest.mark.parametrize("text, message", [
    ("{not json", "not a readable JSON file"),
    ('["levels"]', 'expected a JSON object with a "config" object'),
    ('{"levels": []}', 'expected a JSON object with a "config" object'),
    ('{"config": {"levels": [{"name": "patch", "keep_ratio": 2.0}]}}', "levels.0.keep_ratio"),
    ('{"config": {"no_such_field": 1}}', "no_such_field"),
])
def test_bad_file_is_a_clear_error_naming_it(tmp_path, text, message):
    (tmp_path / MODEL_DEFAULTS_FILE).write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        read_model_defaults(tmp_path)
    assert MODEL_DEFAULTS_FILE in str(err.value)


def test_valid_file_round_trips(tmp_path):
    (tmp_path / MODEL_DEFAULTS_FILE).write_text(json.dumps({"config": {"levels": TOY_LEVELS}}))
    assert MukvConfig.build(read_model_defaults(tmp_path)).levels == toy_config().levels


@pytest.fixture(scope="module")
def model():
    """A random model of the training code's toy shape (49 tokens per frame), with a
    checkpoint's defaults attached."""
    from mukv.train import build_model

    m = build_model("toy", seed=0)
    assert m.tokens_per_frame == 49
    m.default_config = {"levels": TOY_LEVELS}
    yield m
    m.default_config = {}


def test_session_applies_the_model_levels_when_asked_for_none(model):
    with mukv.Session(model=model, device="cpu") as s:
        assert s.config.levels == toy_config().levels
    with mukv.Session(model=model, device="cpu", policy="mukv_time", config={"stream": {"fps": 2.0}}) as s:
        assert s.config.levels == toy_config().levels
        assert s.config.assembly.order == "time" and s.config.stream.fps == 2.0


def test_caller_and_policy_levels_win_over_the_model(model):
    mine = [{"name": "frame", "extractor": "frame", "keep_ratio": 0.5, "top_k": 3}]
    with mukv.Session(model=model, device="cpu", config={"levels": mine}) as s:
        assert [lv.name for lv in s.config.levels] == ["frame"] and s.config.levels[0].keep_ratio == 0.5
    with mukv.Session(model=model, device="cpu", policy="rekv") as s:
        assert [lv.name for lv in s.config.levels] == ["frame"] and s.config.levels[0].keep_ratio == 1.0
    with mukv.Session(model=model, device="cpu", config=MukvConfig.build()) as s:  # a full config is taken as is
        assert s.config.levels == MukvConfig.build().levels


def test_stored_stream_keeps_its_configuration(model, tmp_path):
    """A stream written without the model's defaults reopens with what it was written with."""
    model.default_config = {}
    with mukv.Session(model=model, device="cpu", backend="lancedb", path=tmp_path / "store") as s:
        written = s.config
    model.default_config = {"levels": TOY_LEVELS}
    with mukv.Session.open(tmp_path / "store", model=model, device="cpu") as s:
        assert s.config == written and s.config.levels != toy_config().levels


def test_policy_config_can_sit_on_model_defaults():
    cfg = MukvConfig.from_policy("mukv_timeline", under={"levels": TOY_LEVELS})
    assert cfg.levels == toy_config().levels and cfg.assembly.rerotate
    assert MukvConfig.from_policy("rekv", under={"levels": TOY_LEVELS}).levels[0].keep_ratio == 1.0


def test_hierarchical_variant_runs_at_the_model_levels(model):
    """mukv_hierarchical (segments first) is a policy like the others: the model's levels, the
    strictly hierarchical retriever, answers from every level of a short stream."""
    import numpy as np

    with mukv.Session(model=model, device="cpu", policy="mukv_hierarchical") as s:
        assert s.config.retrieval.retriever == "hierarchical" and s.config.levels == toy_config().levels
        s.feed(np.random.default_rng(0).integers(0, 255, (12, 64, 64, 3), dtype=np.uint8))
        answer = s.ask("what color was the circle?", max_new_tokens=2)
    assert set(answer.levels()) == {"patch", "frame", "segment"}
