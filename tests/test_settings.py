"""The user's settings: a file (JSON, TOML, YAML), MUKV_* variables and the command line, with
their precedence; `mukv config show` and where each value came from; --config / --policy on
every command that builds or opens a session."""

from __future__ import annotations

import json

import pytest

from mukv.cli import build_parser, main
from mukv.config import MukvConfig
from mukv.errors import ConfigError, InputError
from mukv.settings import effective, load, parse_object, read_file

SETTINGS = {"model": "tiny-llava-ov", "device": "cpu", "question_log": True,
            "config": {"retrieval": {"retriever": "cosine", "rerank_n": 3},
                       "scoring": {"scorer": {"name": "dual", "frequency": "frequency_diff"}},
                       "generation": {"max_new_tokens": 7}}}

TOML = """model = "tiny-llava-ov"
device = "cpu"
question_log = true

[config.retrieval]
retriever = "cosine"
rerank_n = 3

[config.scoring.scorer]
name = "dual"
frequency = "frequency_diff"

[config.generation]
max_new_tokens = 7
"""

YAML = """model: tiny-llava-ov
device: cpu
question_log: true
config:
  retrieval: {retriever: cosine, rerank_n: 3}
  scoring:
    scorer: {name: dual, frequency: frequency_diff}
  generation:
    max_new_tokens: 7
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in ("MUKV_MODEL", "MUKV_POLICY", "MUKV_DEVICE", "MUKV_CONFIG", "MUKV_BACKEND", "MUKV_QUESTION_LOG",
                "MUKV_BACKEND_OPTIONS", "MUKV_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


@pytest.mark.parametrize("name, text", [("config.json", json.dumps(SETTINGS)), ("config.toml", TOML),
                                        ("config.yaml", YAML)])
def test_the_same_settings_from_json_toml_and_yaml(tmp_path, name, text):
    folder = tmp_path / "xdg" / "mukv"
    folder.mkdir(parents=True)
    (folder / name).write_text(text)
    settings = load()
    assert settings.model_dump() == {**SETTINGS, "policy": None, "backend": None, "backend_options": {}}
    cfg = MukvConfig.build(settings.config)
    assert cfg.retrieval.retriever == "cosine" and cfg.scoring.scorer == {"name": "dual", "frequency": "frequency_diff"}


def test_the_same_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("MUKV_MODEL", "tiny-llava-ov")
    monkeypatch.setenv("MUKV_DEVICE", "cpu")
    monkeypatch.setenv("MUKV_QUESTION_LOG", "1")
    monkeypatch.setenv("MUKV_CONFIG__RETRIEVAL__RETRIEVER", "cosine")
    monkeypatch.setenv("MUKV_CONFIG__RETRIEVAL__RERANK_N", "3")
    monkeypatch.setenv("MUKV_CONFIG__SCORING__SCORER", '{"name": "dual", "frequency": "frequency_diff"}')
    monkeypatch.setenv("MUKV_CONFIG__GENERATION__MAX_NEW_TOKENS", "7")
    settings = load()
    assert settings.model_dump() == {**SETTINGS, "policy": None, "backend": None, "backend_options": {}}
    assert MukvConfig.build(settings.config) == MukvConfig.build(SETTINGS["config"])


def test_a_whole_config_as_json_in_one_variable(monkeypatch):
    monkeypatch.setenv("MUKV_CONFIG", json.dumps(SETTINGS["config"]))
    assert load().config == SETTINGS["config"]


def test_precedence_command_line_over_environment_over_file(tmp_path, monkeypatch):
    file = tmp_path / "mine.toml"
    file.write_text('model = "from-file"\npolicy = "rekv"\n[config.retrieval]\nretriever = "cosine"\n'
                    'rerank_n = 2\n[config.generation]\nmax_new_tokens = 5\n')
    monkeypatch.setenv("MUKV_CONFIG_FILE", str(file))
    monkeypatch.setenv("MUKV_MODEL", "from-env")
    monkeypatch.setenv("MUKV_CONFIG__GENERATION__MAX_NEW_TOKENS", "6")
    eff = effective({"config": {"generation": {"max_new_tokens": 9}}})
    assert eff.values["model"] == "from-env" and eff.sources["model"] == "env MUKV_MODEL"
    assert eff.values["policy"] == "rekv" and eff.sources["policy"] == f"file {file}"
    assert eff.config == {"retrieval": {"retriever": "cosine", "rerank_n": 2}, "generation": {"max_new_tokens": 9}}
    assert [src for src, _ in eff.config_layers] == [f"file {file}", "env MUKV_CONFIG__GENERATION__MAX_NEW_TOKENS",
                                                      "--config"]
    eff = effective({"model": "from-cli"})
    assert eff.values["model"] == "from-cli" and eff.sources["model"] == "command line"
    assert eff.config["generation"] == {"max_new_tokens": 6}
    # a stream opened again takes only retrieval, assembly and generation from the file and the environment
    file.write_text('[config.retrieval]\nretriever = "cosine"\n[[config.levels]]\nname = "frame"\n'
                    'extractor = "frame"\nkeep_ratio = 1.0\ntop_k = 4\n')
    assert effective(reopen=True).config == {"retrieval": {"retriever": "cosine"}, "generation": {"max_new_tokens": 6}}


def test_bad_settings_name_where_they_came_from(tmp_path, monkeypatch):
    file = tmp_path / "bad.toml"
    file.write_text('modle = "x"\n')
    monkeypatch.setenv("MUKV_CONFIG_FILE", str(file))
    with pytest.raises(ConfigError, match=rf"invalid settings in file {file}:\n  modle: Extra inputs"):
        load()
    file.write_text("model = [1, 2\n")
    with pytest.raises(InputError, match="invalid TOML"):
        load()
    monkeypatch.setenv("MUKV_CONFIG_FILE", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="MUKV_CONFIG_FILE=.*no such file"):
        load()
    monkeypatch.delenv("MUKV_CONFIG_FILE")
    monkeypatch.setenv("MUKV_QUESTION_LOG", "maybe")
    with pytest.raises(ConfigError, match="question_log"):
        load()


def test_config_option_reads_inline_json_and_files(tmp_path):
    assert parse_object('{"generation": {"max_new_tokens": 3}}') == {"generation": {"max_new_tokens": 3}}
    for name, text in (("c.json", '{"generation": {"max_new_tokens": 3}}'),
                       ("c.toml", "[generation]\nmax_new_tokens = 3\n"),
                       ("c.yaml", "generation:\n  max_new_tokens: 3\n"),
                       ("c.yml", "generation: {max_new_tokens: 3}\n"),
                       ("c.conf", "[generation]\nmax_new_tokens = 3\n")):  # unknown suffix: JSON, TOML, then YAML
        (tmp_path / name).write_text(text)
        assert parse_object(str(tmp_path / name)) == {"generation": {"max_new_tokens": 3}}, name
    with pytest.raises(InputError, match="neither a JSON object nor"):
        parse_object("nope.json")
    with pytest.raises(InputError, match="invalid JSON"):
        parse_object("{bad")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="expected an object"):
        read_file(tmp_path / "list.yaml")


# ------------------------------------------------------------------------------ the commands
SESSION_COMMANDS = [["ingest"], ["ask"], ["chat"], ["inspect"], ["plot", "tokens"], ["plot", "timeline"],
                    ["plot", "memory"], ["demo"], ["config", "show"]]


@pytest.mark.parametrize("command", SESSION_COMMANDS, ids=" ".join)
def test_every_session_command_takes_config_and_policy(command):
    parser = build_parser()
    sub = parser
    for word in command:
        sub = next(a for a in sub._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices[word]
    options = {o for a in sub._actions for o in a.option_strings}
    assert {"--config", "--policy", "--model", "--device", "-v", "-q", "--log-json"} <= options


def test_bench_takes_config_and_policy():
    from mukv.cli.bench import _harness_args, _mukv_options

    own, rest = _mukv_options(["--minutes", "1", "--policy", "rekv", "--config", '{"generation": {"max_new_tokens": 2}}',
                               "-v"])
    assert rest == ["--minutes", "1"] and own.verbose == 1
    out = _harness_args(own, rest)
    assert out[:2] == ["--minutes", "1"] and out[out.index("--policies") + 1] == "rekv"
    assert json.loads(out[out.index("--config") + 1]) == {"generation": {"max_new_tokens": 2}}


def test_bench_harness_applies_config_over_every_policy():
    from mukv.bench.evaluate import plan_policies

    plans = plan_policies(["mukv", {"name": "frame_topk", "top_k": 5}], 196, budget_tokens=1960,
                          config={"generation": {"max_new_tokens": 2}})
    assert [p.name for p in plans] == ["mukv", "frame_topk"]
    assert all(p.config.generation.max_new_tokens == 2 for p in plans)
    assert plans[1].config.levels[0].top_k == 10  # the shared budget still sets the baseline's frames


def test_config_show_names_the_source_of_every_value(tmp_path, monkeypatch, capsys):
    file = tmp_path / "c.toml"
    file.write_text('[config.retrieval]\nretriever = "cosine"\n[config.generation]\nmax_new_tokens = 5\n')
    monkeypatch.setenv("MUKV_CONFIG_FILE", str(file))
    monkeypatch.setenv("MUKV_DEVICE", "cpu")
    monkeypatch.setenv("MUKV_CONFIG__RETRIEVAL__RERANK_N", "4")
    assert main(["config", "show", "--policy", "mukv_time", "--config", '{"generation": {"max_new_tokens": 9}}',
                 "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    cfg = shown["config"]
    assert cfg["retrieval.retriever"] == {"value": "cosine", "source": f"file {file}"}
    assert cfg["retrieval.rerank_n"] == {"value": 4, "source": "env MUKV_CONFIG__RETRIEVAL__RERANK_N"}
    assert cfg["generation.max_new_tokens"] == {"value": 9, "source": "--config"}
    assert cfg["assembly.order"] == {"value": "time", "source": "policy mukv_time"}
    assert cfg["levels.2.top_k"] == {"value": 4, "source": "model mukv-tiny"}  # mukv-tiny's own levels
    assert cfg["retrieval.over_retrieval"]["source"] == "default"
    assert shown["settings"]["device"] == {"value": "cpu", "source": "env MUKV_DEVICE"}
    assert shown["settings"]["policy"] == {"value": "mukv_time", "source": "command line"}
    assert main(["config", "show"]) == 0
    text = capsys.readouterr().out
    assert "retrieval.retriever" in text and f"file {file}" in text and "config hash" in text


def test_config_show_refuses_what_a_session_would(capsys):
    assert main(["config", "show", "--config", '{"retrieval": {"retriever": "nope"}}']) == 2
    assert "unknown retriever 'nope'" in capsys.readouterr().err
    assert main(["config", "show", "--config", '{"compression": {"compressor": {"name": "topk", "dedup": 3}}}']) == 2
    assert "compression.compressor.dedup" in capsys.readouterr().err


def test_config_show_of_a_store(tmp_path, capsys):
    import numpy as np

    import mukv

    pytest.importorskip("lancedb")
    store = tmp_path / "s"
    with mukv.Session(model="tiny-llava-ov", backend="lancedb", path=store) as s:
        s.feed(np.zeros((4, 32, 32, 3), dtype=np.uint8))
    assert main(["config", "show", str(store), "--config", '{"retrieval": {"retriever": "cosine"}}', "--json"]) == 0
    cfg = json.loads(capsys.readouterr().out)["config"]
    assert cfg["retrieval.retriever"] == {"value": "cosine", "source": "--config"}
    assert cfg["levels.0.keep_ratio"]["source"] == f"store {store}"
    assert main(["config", "show", str(store), "--policy", "rekv"]) == 2
    assert "cannot change levels" in capsys.readouterr().err


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node, parts = out, path.split(".")
        for part, nxt in zip(parts, parts[1:] + [None]):
            if nxt is None:
                node[part] = value
            else:
                node = node.setdefault(part, {})
    def lists(x):
        if isinstance(x, dict):
            if x and all(k.isdigit() for k in x):
                return [lists(x[k]) for k in sorted(x, key=int)]
            return {k: lists(v) for k, v in x.items()}
        return x
    return lists(out)


@pytest.mark.parametrize("fmt", ["json", "yaml", "env"])
def test_config_show_round_trips_through_a_file_and_the_environment(tmp_path, monkeypatch, capsys, fmt):
    """What `config show --json` prints, given back as --config (a JSON or YAML file) or as
    MUKV_CONFIG, is the same configuration (the same hash)."""
    import yaml

    given = {"retrieval": {"retriever": "cosine", "rerank_n": 2},
             "compression": {"compressor": {"name": "topk", "dedup": True}}, "assembly": {"order": "time"}}
    assert main(["config", "show", "--config", json.dumps(given), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    full = _unflatten({path: v["value"] for path, v in shown["config"].items()})
    if fmt == "env":
        monkeypatch.setenv("MUKV_CONFIG", json.dumps(full))
        argv = ["config", "show", "--json"]
    else:
        file = tmp_path / f"c.{fmt}"
        file.write_text(json.dumps(full) if fmt == "json" else yaml.safe_dump(full))
        argv = ["config", "show", "--config", str(file), "--json"]
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["config_hash"] == shown["config_hash"]
    assert {p: v["value"] for p, v in again["config"].items()} == {p: v["value"] for p, v in shown["config"].items()}


def test_a_stored_stream_takes_only_what_fork_allows_and_is_left_unchanged_otherwise(tmp_path, capsys):
    import numpy as np

    import mukv

    pytest.importorskip("lancedb")
    store = tmp_path / "s"
    with mukv.Session(model="tiny-llava-ov", backend="lancedb", path=store) as s:
        s.feed(np.zeros((8, 64, 64, 3), dtype=np.uint8))  # the synthetic stream's frame size
        before = s.stats()
    for argv in (["ingest", str(store), "--synthetic", "0.2", "--no-progress", "--policy", "rekv"],
                 ["ingest", str(store), "--synthetic", "0.2", "--no-progress", "--config",
                  '{"compression": {"compressor": {"name": "topk", "dedup": true}}}'],
                 ["ask", str(store), "q?", "--config", '{"scoring": {"scorer": "attention"}}'],
                 ["chat", str(store), "--config", '{"stream": {"fps": 2}}']):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "keeps the configuration it was stored with" in err and "cannot change" in err, err
    with mukv.Session.open(store) as s:
        assert s.stats() == before  # nothing stored, nothing changed
    assert main(["ingest", str(store), "--synthetic", "0.2", "--no-progress", "--config",
                 '{"generation": {"max_new_tokens": 2}, "retrieval": {"retriever": "cosine"}}']) == 0
    capsys.readouterr()
    assert main(["ask", str(store), "q?", "--policy", "mukv_time", "--config",
                 '{"levels": [{"name": "patch", "extractor": "patch_raster", "tokens": 49, "keep_ratio": 0.1, '
                 '"alpha": 0.5, "top_k": 1, "rerank_weight": 0.3}, {"name": "frame", "extractor": "frame", '
                 '"keep_ratio": 0.1, "alpha": 0.7, "top_k": 2, "rerank_weight": 0.3}, {"name": "segment", '
                 '"extractor": "segment", "frames": 4, "keep_ratio": 0.8, "alpha": 0.8, "top_k": 1}]}',
                 "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert {b["level"] for b in answer["blocks"]} == {"patch", "frame", "segment"}
    assert sum(b["level"] == "frame" for b in answer["blocks"]) == 2  # top_k may change
    with mukv.Session.open(store) as s:
        assert s.stats()["frames"] > before["frames"]
        assert s.config.retrieval.retriever == "semi_hierarchical"  # the stored configuration is unchanged
