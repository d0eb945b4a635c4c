"""Logging under the `mukv` logger, the library's silence, and -v/-vv/-q/--log-json on the CLI;
one default model (mukv-tiny) for Session and the CLI, and a warning for random weights."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

import mukv
import mukv.registry
from mukv.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_logs_under_the_mukv_logger():
    pattern = re.compile(r"getLogger\(([^)]*)\)")
    for path in [*(ROOT / "mukv").rglob("*.py"), *(ROOT / "plugins").rglob("*.py"), *(ROOT / "backends").rglob("*.py")]:
        for arg in pattern.findall(path.read_text()):
            assert arg in ("__name__", "LOGGER", '"mukv"'), f"{path}: getLogger({arg})"


def test_the_library_prints_nothing(capsys, caplog, tiny_model):
    frames = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    with caplog.at_level(logging.DEBUG, logger="mukv"):
        with mukv.Session(model=tiny_model) as s:
            s.feed(frames)
            s.ask("what color?", max_new_tokens=1)
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("mukv")]
    assert any("session over stream 'default'" in m for m in messages)
    assert any(m.startswith("answered in") for m in messages)


def test_session_defaults_to_mukv_tiny_like_the_cli(caplog):
    import inspect

    from mukv.cli.common import TRAINED_MODEL
    from mukv.session import DEFAULT_MODEL, Session

    assert inspect.signature(Session).parameters["model"].default == DEFAULT_MODEL == TRAINED_MODEL == "mukv-tiny"
    with caplog.at_level(logging.WARNING, logger="mukv"):
        with mukv.Session() as s:
            assert s.model.name == "mukv-tiny" and not s.model.random_weights
    assert not [r for r in caplog.records if "random weights" in r.getMessage()]


def test_a_random_weight_preset_warns_once_per_model(caplog):
    from mukv.session import load_model

    model = load_model("tiny-llava-ov", __import__("torch").device("cpu"))
    with caplog.at_level(logging.WARNING, logger="mukv"):
        mukv.Session(model=model).close()
        mukv.Session(model=model).close()
    warned = [r for r in caplog.records if "random weights" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert "meaningless" in warned[0].getMessage() and "tiny-llava-ov" in warned[0].getMessage()


def _store(tmp_path) -> Path:
    pytest.importorskip("lancedb")
    path = tmp_path / "s"
    with mukv.Session(model="tiny-llava-ov", backend="lancedb", path=path) as s:
        s.feed(np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8))
    return path


def test_verbosity_flags(tmp_path, capsys):
    store = _store(tmp_path)
    assert main(["ask", str(store), "what?", "--max-new-tokens", "1"]) == 0
    err = capsys.readouterr().err
    assert "mukv: warning: model tiny-llava-ov has random weights" in err and "info" not in err
    assert main(["-v", "ask", str(store), "what?", "--max-new-tokens", "1"]) == 0
    err = capsys.readouterr().err
    assert "mukv: info: session over stream 'default'" in err and "mukv: info: answered in" in err
    assert "debug" not in err
    mukv.registry.reset()  # so that the plugins load again, as in a new process
    assert main(["ask", str(store), "what?", "--max-new-tokens", "1", "-vv"]) == 0  # after the command too
    err = capsys.readouterr().err
    assert "mukv.registry: debug: loaded plugin" in err and "mukv.session: info:" in err
    assert main(["-q", "ask", str(store), "what?", "--max-new-tokens", "1"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "A: " in out
    assert logging.getLogger("mukv").handlers == []  # each run takes its handler away again


def test_log_json(tmp_path, capsys):
    store = _store(tmp_path)
    assert main(["--log-json", "-v", "ask", str(store), "what?", "--max-new-tokens", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert {"warning", "info"} <= {line["level"] for line in lines}
    assert any(line["logger"] == "mukv.session" for line in lines)
    assert main(["ask", str(tmp_path / "missing"), "q?", "--log-json"]) == 2
    (line,) = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert line["level"] == "error" and "no such store" in line["message"]
