"""The ``mukv`` command: --help everywhere, one-line errors, demo, and a store's life
(ingest, inspect, ask, chat, plot) on the disk tier."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

import mukv
from mukv import cli

PNG = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def subcommands(parser: argparse.ArgumentParser, prefix=()) -> list[tuple[str, ...]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append((*prefix, name))
                out += subcommands(sub, (*prefix, name))
    return out


COMMANDS = subcommands(cli.build_parser())


def test_every_command_of_the_issue_exists():
    names = {c[0] for c in COMMANDS}
    assert {"ingest", "ask", "chat", "demo", "bench", "plugins", "inspect", "plot"} <= names


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != ("bench",)], ids=" ".join)
def test_help_for_every_command(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mukv " + " ".join(command))
    assert len(out.splitlines()) > 3


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in ("demo", "ingest", "ask", "chat", "inspect", "plot", "bench", "plugins"):
        assert name in out


def test_bench_help(capsys):
    try:
        rc = cli.main(["bench", "--help"])
    except SystemExit as exc:  # the harness's argparse
        rc = exc.code
    out = capsys.readouterr().out
    assert rc == 0 and "usage" in out.lower() or "not available yet" in out


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "mukv", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("mukv ")


# ------------------------------------------------------------------------------ plugins
def test_plugins_lists_builtins_with_their_package(capsys):
    rc, out, _ = run(capsys, "plugins")
    assert rc == 0
    header, *rows = out.splitlines()
    assert header.split() == ["role", "name", "plugin", "package", "settings"]
    assert any(r.split()[:2] == ["scorers", "dual"] and "mukv 0.1.0" in r for r in rows)
    assert any(r.split()[:2] == ["backends", "memory"] for r in rows)


def test_plugins_role_and_json(capsys):
    rc, out, _ = run(capsys, "plugins", "--role", "retrievers", "--json")
    rows = json.loads(out)
    assert rc == 0 and rows and all(r["role"] == "retrievers" for r in rows)
    assert {"semi_hierarchical", "cosine"} <= {r["name"] for r in rows}


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("argv, words", [
    (["ask", "/nonexistent/store.mukv", "q?"], "no such store"),
    (["inspect", "/nonexistent/store.mukv"], "no such store"),
    (["ingest", "{tmp}/s.mukv"], "nothing to ingest"),
    (["ingest", "{tmp}/s.mukv", "{tmp}/missing.mp4"], "video file not found"),
    (["ingest", "{tmp}/s.mukv", "--synthetic", "-3"], "positive"),
    (["demo", "--minutes", "0"], "--minutes"),
    (["demo", "--questions", "0"], "--questions"),
    (["demo", "--config", "{{not json"], "--config"),
    (["demo", "--config", '{"levels": []}'], "levels"),
    (["demo", "--policy", "nope"], "registered policies"),
    (["ingest", "{tmp}/s.mukv", "--synthetic", "1", "--backend", "nope"], "unknown backend 'nope'"),
    (["plot", "tokens", "{tmp}/missing.png", "-o", "{tmp}/x.png"], "file not found"),
])
def test_errors_are_one_line_with_status_2(argv, words, capsys, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc, out, err = run(capsys, *argv)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mukv: error: "), err
    assert words in lines[0], lines[0]


def test_bad_arguments_exit_2(capsys):
    assert cli.main(["ask"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mukv: error: ask: ")


def test_bench_without_harness_says_so(capsys, monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == cli.BENCH_MODULE:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    rc, _, err = run(capsys, "bench", "--minutes", "1")
    assert rc == 2 and "not available yet" in err and len(err.strip().splitlines()) == 1


def test_bench_forwards_to_the_harness(capsys, monkeypatch):
    import types

    seen = {}
    harness = types.SimpleNamespace(main=lambda argv: seen.setdefault("argv", argv) and 0)
    monkeypatch.setitem(sys.modules, cli.BENCH_MODULE, harness)
    rc, _, _ = run(capsys, "bench", "--minutes", "1", "--policies", "mukv")
    assert rc == 0 and seen["argv"] == ["--minutes", "1", "--policies", "mukv"]


# ------------------------------------------------------------------------------ demo
def test_demo_prints_answers_truth_levels_and_writes_pictures(capsys, tmp_path):
    paths = {k: tmp_path / f"{k}.png" for k in ("timeline", "tokens", "memory")}
    rc, out, err = run(capsys, "demo", "--model", "tiny-llava-ov", "--minutes", "4", "--questions", "2", "--no-progress",
                       "--plot", str(paths["timeline"]), "--plot-tokens", str(paths["tokens"]),
                       "--plot-memory", str(paths["memory"]))
    assert rc == 0, err
    # three short clips first, then the stream's two questions
    assert out.count("  Q: ") == 3 + 2 and out.count("truth: ") == 3 + 2
    assert "1. short clips" in out and "2. 4 minutes of stream" in out
    assert "clips      " in out and "/3 correct (8-frame clips" in out
    assert "retrieved: " in out and "patch" in out and "segment" in out
    assert "evidence scene among them" in out
    for word in ("summary", "answers", "ingest", "frames/s", "memory", "KV tokens per answer"):
        assert word in out, word
    assert "random weights" in out  # tiny-llava-ov's note
    for p in paths.values():
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 10_000


def test_demo_model_is_mukv_tiny_when_it_loads_else_the_random_one(monkeypatch):
    from mukv.errors import StoreError
    from mukv.registry import Entry

    assert cli.pick_model("tiny-llava-ov")[1:] == ("tiny-llava-ov", cli._RANDOM_NOTE)
    assert cli.pick_model("/some/checkpoint") == ("/some/checkpoint", "/some/checkpoint", None)
    reg = mukv.get_registry()
    models = dict(reg.entries["models"])

    def broken(device=None, dtype=None):
        raise StoreError("the mukv-tiny checkpoint is missing from /x; reinstall")

    monkeypatch.setitem(reg.entries, "models", {**models, "mukv-tiny": Entry("mukv-tiny", broken, "m", "p")})
    model, name, note = cli.pick_model(None)
    assert (model, name) == ("tiny-llava-ov", "tiny-llava-ov")
    assert "mukv-tiny cannot be loaded (the mukv-tiny checkpoint is missing from /x)" in note
    monkeypatch.setitem(reg.entries, "models", {k: v for k, v in models.items() if k != "mukv-tiny"})
    assert "mukv-tiny is not installed" in cli.pick_model(None)[2]
    sentinel = object()
    monkeypatch.setitem(reg.entries, "models", {**models, "mukv-tiny": Entry("mukv-tiny", lambda device=None,
                                                dtype=None: sentinel, "m", "p")})
    assert cli.pick_model(None) == (sentinel, "mukv-tiny", None)


# ------------------------------------------------------------------------------ a store's life
def needs_disk():
    if "lancedb" not in mukv.get_registry().entries["backends"]:
        pytest.skip("the lancedb backend (disk tier) is not registered yet: store commands need it")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with 3 minutes of generated stream (90 frames), written by `mukv ingest`."""
    if "lancedb" not in mukv.get_registry().entries["backends"]:
        pytest.skip("the lancedb backend (disk tier) is not registered yet: store commands need it")
    path = tmp_path_factory.mktemp("cli") / "s.mukv"
    rc = cli.main(["ingest", str(path), "--synthetic", "2", "--chunk", "30", "--no-progress",
                   "--model", "tiny-llava-ov"])
    assert rc == 0
    rc = cli.main(["ingest", str(path), "--synthetic", "1", "--seed", "3", "--no-progress"])  # continues the stream
    assert rc == 0
    return path


def test_ingest_continues_and_inspect_shows_levels_and_tiers(store, capsys):
    rc, out, _ = run(capsys, "inspect", str(store))
    assert rc == 0
    assert "90 frames" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["patch"], ["frame"], ["segment"])]
    blocks = {}
    for level, tier, n, *_ in rows:
        blocks.setdefault(level, {})[tier] = int(n.replace(",", ""))
    assert max(blocks["patch"].values()) == 360 and max(blocks["frame"].values()) == 90
    assert max(blocks["segment"].values()) == 22
    assert {"hot", "disk"} <= set(blocks["frame"]), blocks
    rc, out, _ = run(capsys, "inspect", str(store), "--json")
    data = json.loads(out)
    assert data["frames"] == 90 and data["stats"]["frame"]["blocks"] == 90
    assert set(data["tiers"]["segment"]) >= {"hot", "disk"}


def test_ingest_refuses_a_new_configuration_for_an_existing_stream(store, capsys):
    rc, _, err = run(capsys, "ingest", str(store), "--synthetic", "1", "--policy", "rekv")
    assert rc == 2 and "keeps the configuration it was stored with" in err and "cannot change levels" in err
    assert "--policy" in err


def test_ask_prints_answer_levels_and_plots(store, capsys, tmp_path):
    png = tmp_path / "t.png"
    rc, out, _ = run(capsys, "ask", str(store), "what color was the square?", "--max-new-tokens", "2",
                     "--top-k", "frame=4", "segment=2", "patch=3", "--plot", str(png))
    assert rc == 0
    assert out.startswith("Q: what color was the square?") and "\nA: " in out
    assert "3 patch, 4 frame, 2 segment blocks" in out
    assert png.read_bytes()[:8] == PNG
    rc, out, _ = run(capsys, "ask", str(store), "what?", "--json", "--max-new-tokens", "1")
    answer = json.loads(out)
    assert answer["question"] == "what?" and answer["blocks"] and answer["kv_tokens"] > 0


def test_ask_errors(store, capsys):
    rc, _, err = run(capsys, "ask", str(store), "q?", "--top-k", "frame=100000")
    assert rc == 2 and "top_k" in err
    rc, _, err = run(capsys, "ask", str(store), "q?", "--top-k", "frame")
    assert rc == 2 and "LEVEL=K" in err
    rc, _, err = run(capsys, "ask", str(store), "q?", "--stream-id", "other")
    assert rc == 2 and "no mukv stream 'other'" in err


def test_chat_reads_questions_and_commands_from_stdin(store, capsys, monkeypatch, tmp_path):
    import io

    png = tmp_path / "chat.png"
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"what color?\n/stats\n/plot {png}\n/bogus\n\nwhat shape?\n/quit\nnever\n"))
    rc, out, err = run(capsys, "chat", str(store), "--max-new-tokens", "2")
    assert rc == 0
    assert out.count("Q: ") == 2 and "never" not in out
    assert "level" in out and "tier" in out  # /stats
    assert png.read_bytes()[:8] == PNG
    assert "unknown command '/bogus'" in err


def test_plot_memory_and_timeline_from_a_store(store, capsys, tmp_path):
    rc, out, _ = run(capsys, "inspect", str(store), "--plot", str(tmp_path / "m.png"))
    assert rc == 0 and (tmp_path / "m.png").read_bytes()[:8] == PNG
    rc, _, _ = run(capsys, "plot", "memory", str(store), "-o", str(tmp_path / "m2.png"))
    assert rc == 0 and (tmp_path / "m2.png").read_bytes()[:8] == PNG
    rc, _, _ = run(capsys, "plot", "timeline", str(store), "what?", "-o", str(tmp_path / "t.png"),
                   "--max-new-tokens", "1")
    assert rc == 0 and (tmp_path / "t.png").read_bytes()[:8] == PNG


def test_memory_history_is_recorded_by_ingest(store):
    from mukv import plots

    with mukv.Session.open(store) as s:
        history = plots.memory_history(s)
    assert [h["frames"] for h in history] == [30, 60, 90]
    assert all(h["tiers"] for h in history)


def test_ingest_video_files(capsys, tmp_path):
    needs_disk()
    av = pytest.importorskip("av")
    video = tmp_path / "clip.mp4"
    frames = np.random.default_rng(1).integers(0, 255, (20, 64, 64, 3), dtype=np.uint8)
    with av.open(str(video), "w") as out:
        stream = out.add_stream("mpeg4", rate=2)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    store = tmp_path / "v.mukv"
    rc, out, err = run(capsys, "ingest", str(store), str(video), str(video), "--fps", "1", "--chunk", "4",
                       "--no-progress", "--model", "tiny-llava-ov")
    assert rc == 0, err
    assert "ingested 10 frames" in out and "skipped" in out  # 10 s of video at 1 fps; the same content once
    rc, out, err = run(capsys, "ingest", str(store), str(video), "--fps", "1", "--chunk", "4", "--force",
                       "--no-progress")
    assert rc == 0 and "ingested 10 frames" in out, err  # --force adds it again
    with mukv.Session.open(store) as s:
        st = s.stats()
        assert st["frames"] == 20 and st["levels"]["segment"]["blocks"] == 5
        assert st["last_time"] == pytest.approx(19.0)  # the second file continues the stream's time
    rc, out, err = run(capsys, "plot", "tokens", str(video), "--at", "3", "-o", str(tmp_path / "v.png"),
                       "--model", "tiny-llava-ov")
    assert rc == 0, err


def test_plot_tokens_from_an_image(capsys, tmp_path):
    from PIL import Image

    img = tmp_path / "frame.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(img)
    rc, out, err = run(capsys, "plot", "tokens", str(img), "-o", str(tmp_path / "tok.png"), "--model", "tiny-llava-ov",
                       "--level", "frame")
    assert rc == 0, err
    assert (tmp_path / "tok.png").read_bytes()[:8] == PNG


def test_inspect_verify_reports_damage_and_exit_status(tmp_path, tiny_model):
    """`mukv inspect STORE --verify` checks a store without a model and exits 1 on damage."""
    import subprocess
    import sys

    import numpy as np

    import mukv

    store = tmp_path / "v"
    with mukv.Session(model=tiny_model, backend="lancedb", path=store) as s:
        s.feed(np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8))
    ok = subprocess.run([sys.executable, "-m", "mukv", "inspect", str(store), "--verify"], capture_output=True,
                        text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout and "frame 4/4" in ok.stdout
    shard = max((p for p in (store / "kv").rglob("*") if p.is_file() and "segment" in str(p)),
                key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte inside the segment KV
    shard.write_bytes(bytes(data))
    bad = subprocess.run([sys.executable, "-m", "mukv", "inspect", str(store), "--verify"], capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "DAMAGED" in bad.stdout and "segment" in bad.stdout
