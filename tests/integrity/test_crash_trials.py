"""Crash and interrupt trials (issue 15): a short run of benchmarks/crash_trials.py, every scenario under
SIGKILL, SIGINT and SIGTERM. The full count (200+) is measured by the script itself (docs/hardening.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_every_scenario_survives_kill_and_interrupts(tmp_path):
    out = tmp_path / "trials.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "crash_trials.py"), "--trials", "15",
                           "--seed", "3", "--series", "5", "--out", str(out)], capture_output=True, text=True,
                          timeout=1800)
    summary = json.loads(out.read_text())["summary"]
    assert proc.returncode == 0 and summary["failed"] == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary["trials"] == 15 and len(summary["by"]) == 15  # 5 scenarios x 3 signals
