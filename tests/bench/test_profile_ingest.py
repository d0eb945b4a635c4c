"""benchmarks/profile_ingest.py runs on the CPU with the tiny model (its flow, not its figures): each
profiled step is timed and its stages and kernels written to profile.json."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_ingest.py"


def test_the_profile_of_each_step_is_written(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("profile_ingest", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--device", "cpu", "--preset", "tiny-llava-ov", "--frames", "4", "--top", "3",
                     "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "profile.json").read_text())
    for step in ("preprocess", "vision", "tower", "ingest"):
        assert res[step]["wall_ms"] > 0
    assert set(res["stages"]) >= {"prefill", "score", "compress", "store"}
    assert mod.gb.kernel_kind("nvjet_sm90_tst_192x192") == "matmul"
    assert mod.gb.kernel_kind("pytorch_flash::flash_fwd_kernel") == "attention"
