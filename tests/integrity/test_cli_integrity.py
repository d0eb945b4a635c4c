"""The command line keeps streams whole (issue 15, cases 3, 7, 8, CLI errors): interrupts commit what is
complete and resume exactly, readers never block writers, files of another size are refused before
anything is stored, bad input is one line and exit status 2."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

import mukv
from integrity_helpers import mukv_cli, one_error_line, state, write_mp4
from mukv.backends.disk import verify_store

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
MODEL = ["--model", "tiny-llava-ov", "--no-progress"]


def frame_blocks(store) -> int:
    return state(store)["counts"].get("frame", 0)


@pytest.mark.slow
@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_ingest_commits_what_is_complete_and_resumes_exactly(tmp_path, sig, status):
    n = 960  # 2 minutes at 8 fps: long enough that the signal lands mid-ingest on a fast idle machine too
    video = write_mp4(tmp_path / "long.mp4", n, fps=8)
    store = tmp_path / "s.mukv"
    args = [sys.executable, "-m", "mukv", "ingest", str(store), str(video), "--fps", "8", "--chunk", "8", *MODEL]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # wait until some chunks are committed, then interrupt
        try:
            if state(store)["values"].get("frames_seen", 0) >= 16:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == status, (out, err)
    assert "interrupted" in out and "committed" in out and "resume" in out, out
    st = state(store)
    seen = st["values"]["frames_seen"]
    assert 16 <= seen < n and seen % 8 == 0  # whole chunks only
    assert frame_blocks(store) == seen  # the bookkeeping says what the blocks say
    report = verify_store(str(store))
    assert report.ok, report.summary()
    done = mukv_cli("ingest", str(store), str(video), "--fps", "8", "--chunk", "8", *MODEL)
    assert done.returncode == 0, done.stderr
    st = state(store)
    assert st["values"]["frames_seen"] == n and frame_blocks(store) == n  # resumed at the next frame
    src = [s for s in st["values"]["sources"] if s["kind"] == "video"]
    assert len(src) == 1 and src[0]["complete"] and src[0]["frames"] == [0, n] and src[0]["consumed"] == n
    assert verify_store(str(store)).ok  # no frame index or time repeated
    with mukv.Session.open(store, read_only=True) as s:
        times = s.backend.metadata("frame", mukv.session.torch.arange(n)).t_start
        assert bool((times[1:] > times[:-1]).all()) and float(times[-1]) == pytest.approx((n - 1) / 8)


@pytest.mark.slow
def test_a_chat_reader_never_blocks_an_ingest(tmp_path):
    video = write_mp4(tmp_path / "a.mp4", 16, fps=4)
    store = tmp_path / "s.mukv"
    assert mukv_cli("ingest", str(store), str(video), "--fps", "2", *MODEL).returncode == 0
    chat = subprocess.Popen([sys.executable, "-m", "mukv", "chat", str(store)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        chat.stdin.write("/stats\n")
        chat.stdin.flush()
        time.sleep(2)  # the chat has the store open
        second = mukv_cli("ask", str(store), "what?", "--json")  # a second reader
        assert second.returncode == 0, second.stderr
        more = write_mp4(tmp_path / "b.mp4", 16, fps=4, seed=3)
        ingest = mukv_cli("ingest", str(store), str(more), "--fps", "2", *MODEL)
        assert ingest.returncode == 0, ingest.stderr  # the writer was not blocked by either reader
        out, err = chat.communicate("what happened?\n/quit\n", timeout=120)
    finally:
        chat.kill()
    assert "A:" in out and "read-only" not in err and "being written" not in err
    assert state(store)["values"]["frames_seen"] == 16


@pytest.mark.slow
def test_files_of_another_size_are_refused_before_anything_is_stored(tmp_path):
    a = write_mp4(tmp_path / "a.mp4", 8, fps=4, side=32)
    b = write_mp4(tmp_path / "b.mp4", 8, fps=4, side=48, seed=1)
    c = write_mp4(tmp_path / "c.mp4", 8, fps=4, side=32, seed=2)
    store = tmp_path / "s.mukv"
    line = one_error_line(mukv_cli("ingest", str(store), str(a), str(b), str(c), "--fps", "2", *MODEL))
    assert "b.mp4" in line and "48x48" in line and "--resize" in line and "nothing was ingested" in line
    assert state(store)["values"].get("frames_seen", 0) == 0
    ok = mukv_cli("ingest", str(store), str(a), str(c), "--fps", "2", *MODEL)
    assert ok.returncode == 0 and state(store)["values"]["frames_seen"] == 8
    again = mukv_cli("ingest", str(store), str(a), "--fps", "2", *MODEL)  # the same file again: skipped
    assert again.returncode == 0 and "skipped" in again.stdout and state(store)["values"]["frames_seen"] == 8
    line = one_error_line(mukv_cli("ingest", str(store), str(b), "--fps", "2", *MODEL))  # a separate command too
    assert "48x48" in line
    forced = mukv_cli("ingest", str(store), str(a), str(b), "--fps", "2", "--resize", "--force", *MODEL)
    assert forced.returncode == 0, forced.stderr
    values = state(store)["values"]
    assert values["frames_seen"] == 16 and values["session"]["frame_size"] == [32, 32]
    assert values["sources"][-1]["resized_from"] == [48, 48]
    assert verify_store(str(store)).ok


@pytest.mark.parametrize("args", [
    ["ingest", "{store}", "{video}", "--chunk", "-1"],
    ["ingest", "{store}", "{video}", "--chunk", "0"],
    ["ingest", "{store}", "{video}", "--fps", "1e9"],
    ["ingest", "{store}", "{video}", "--fps", "nan"],
    ["ingest", "{store}", "{video}", "--fps", "1e-300"],
    ["ingest", "{store}"],
    ["ingest", "{store}", "{tmp}/missing.mp4"],
    ["ingest", "{store}", "{video}", "--config", "{{not json"],
    ["ingest", "{store}", "{video}", "--stream-id", "../x"],
    ["ask", "{store}", "what?", "--since", "yesterday"],
    ["ask", "{store}", "what?", "--since", "30", "--until", "3"],
    ["ask", "{store}", "what?", "--max-new-tokens", "-3"],
    ["ask", "{store}", "what?", "--stream-id", "nope"],
    ["ask", "{tmp}/nostore", "what?"],
    ["inspect", "{store}", "--repair"],
    ["demo", "--minutes", "-1"],
    ["demo", "--questions", "0"],
    ["streams", "delete", "{store}", "nope"],
    ["streams", "export", "{store}", "default", "{store}"],
    ["streams", "list", "{tmp}"],
    ["repair", "{tmp}/nostore"],
    ["plot", "tokens", "{tmp}/missing.png", "-o", "{tmp}/x.png"],
    ["nosuchcommand"],
    ["ask"],
    ["bench", "--no-such-flag"],
])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, args, ingested):
    store, video = ingested
    filled = [a.format(store=store, video=video, tmp=tmp_path) for a in args]
    line = one_error_line(mukv_cli(*filled))
    assert len(line) < 800


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    video = write_mp4(tmp / "v.mp4", 8, fps=4)
    store = tmp / "s.mukv"
    assert mukv_cli("ingest", str(store), str(video), "--fps", "2", *MODEL).returncode == 0
    return store, video


@pytest.mark.slow
def test_streams_and_repair_commands(tmp_path, ingested):
    store, video = ingested
    listed = mukv_cli("streams", "list", str(store), "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["frames"] == 4
    table = mukv_cli("streams", "list", str(store))
    assert "default" in table.stdout and "v.mp4" in table.stdout
    exp = mukv_cli("streams", "export", str(store), "default", str(tmp_path / "exp"))
    assert exp.returncode == 0 and "verified" in exp.stdout
    imp = mukv_cli("streams", "import", str(store), str(tmp_path / "exp"), "--as", "copy")
    assert imp.returncode == 0, imp.stderr
    rep = mukv_cli("repair", str(store))
    assert rep.returncode == 0 and "nothing to repair" in rep.stdout
    ver = mukv_cli("inspect", str(store), "--verify")
    assert ver.returncode == 0 and "2 stream(s)" in ver.stdout
    gone = mukv_cli("streams", "delete", str(store), "copy")
    assert gone.returncode == 0 and "deleted stream 'copy'" in gone.stdout
    ask = mukv_cli("ask", str(store), "what?", "--since", "1", "--until", "2.5", "--json")
    blocks = json.loads(ask.stdout)["blocks"]
    assert ask.returncode == 0 and blocks and all(1 <= b["t_start"] and b["t_end"] <= 2.5 for b in blocks)
