"""benchmarks/compare_runs.py pools the records of runs made apart and pairs them by question."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import load_benchmark


def _script():
    return load_benchmark("compare_runs")


def _run(path: Path, policy: str, codec, seed: int, correct: list[bool], weights: str | None = None) -> Path:
    records = [{"policy": policy, "minutes": 64.0, "seed": seed, "id": f"q{i}", "correct": c}
               for i, c in enumerate(correct)]
    settings = {"kv_codec": codec, "model": "mukv-tiny"}
    if weights:
        settings["provenance"] = {"model": {"checkpoint_sha256": weights}}
    path.write_text(json.dumps({"settings": settings, "records": records}))
    return path


def test_labels_accuracies_and_a_paired_difference(tmp_path, capsys):
    mod = _script()
    files = [_run(tmp_path / "a1.json", "mukv", "none", 1, [True, True, False, True]),
             _run(tmp_path / "a2.json", "mukv", "none", 2, [True, False, False, True]),
             _run(tmp_path / "b1.json", "mukv", {"name": "kivi4", "key_bits": 6}, 1, [True, False, False, True]),
             _run(tmp_path / "b2.json", "mukv", {"name": "kivi4", "key_bits": 6}, 2, [True, False, False, False])]
    assert mod.main([str(f) for f in files] + ["--pair", "mukv+kivi4(key_bits=6):mukv"]) == 0
    out = capsys.readouterr().out
    assert "## 64 minutes" in out
    assert "mukv                         0.62" in out and "(8 questions, seeds [1, 2])" in out
    assert "mukv+kivi4(key_bits=6)       0.38" in out
    assert "mukv+kivi4(key_bits=6) - mukv: -25.0 points" in out and "over 8 common questions, 2 seeds" in out


def test_a_file_that_is_not_a_result_or_a_run_given_twice_is_refused(tmp_path):
    mod = _script()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match="not a results.json"):
        mod.main([str(bad)])
    a = _run(tmp_path / "a.json", "mukv", "none", 1, [True, False])
    b = _run(tmp_path / "b.json", "mukv", "none", 1, [False, False])
    with pytest.raises(SystemExit, match="another result"):
        mod.main([str(a), str(b)])


def test_runs_of_two_checkpoints_are_labelled_by_their_weights(tmp_path, capsys):
    """The same policy on the same questions from two checkpoints pairs them, checkpoint against checkpoint."""
    mod = _script()
    old, new = "a" * 64, "b" * 64
    files = [_run(tmp_path / "old.json", "mukv", "none", 1, [True, False, False, False], weights=old),
             _run(tmp_path / "new.json", "mukv", "none", 1, [True, True, True, False], weights=new)]
    assert mod.main([str(f) for f in files] + ["--by-model", "--pair", f"mukv#{new[:12]}:mukv#{old[:12]}"]) == 0
    out = capsys.readouterr().out
    assert f"mukv#{old[:12]}" in out and f"mukv#{new[:12]}" in out
    assert f"mukv#{new[:12]} - mukv#{old[:12]}: +50.0 points" in out
    with pytest.raises(SystemExit, match="another result"):  # without --by-model they are one label
        mod.main([str(f) for f in files])
