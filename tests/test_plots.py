"""Pictures: retrieval timelines, token importance, memory over time (PNG from the API)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import mukv
from mukv import plots
from mukv.blocks import Answer, RetrievedBlock
from mukv.errors import InputError

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size


@pytest.fixture(scope="module")
def fed(tiny_model):
    """A session over 24 frames of a generated stream, and the frames."""
    from mukv.bench import Benchmark

    frames = Benchmark.generate(seed=0, minutes=1, questions=0).stream.frames(0, 24)
    s = mukv.Session(model=tiny_model)
    s.feed(frames)
    yield s, frames
    s.close()


def test_retrieval_timeline_png(fed, tmp_path):
    s, _ = fed
    answer = s.ask("what color was the circle?", max_new_tokens=2)
    out = plots.plot_retrieval_timeline(answer, tmp_path / "t.png", duration=s.stats()["last_time"],
                                        evidence=(10.0, 14.0))
    data = out.read_bytes()
    assert out == tmp_path / "t.png" and data[:8] == PNG
    w, h = png_size(data)
    assert w > 800 and h > 300
    assert plots.plot_retrieval_timeline(answer)[:8] == PNG  # bytes when no path
    assert plots.plot_retrieval_timeline(answer.blocks, tmp_path / "b.png", title="blocks only").exists()


def test_timeline_handles_one_level_and_equal_scores(tmp_path):
    blocks = [RetrievedBlock("frame", i, 0.5, i, i + 1, 2.0 * i, 2.0 * i, 19) for i in range(3)]
    plots.plot_retrieval_timeline(Answer("q", "a", blocks, 60), tmp_path / "one.png")
    assert (tmp_path / "one.png").read_bytes()[:8] == PNG


def test_timeline_of_an_empty_answer_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no retrieved block"):
        plots.plot_retrieval_timeline(Answer("q", "a"), tmp_path / "x.png")


def test_token_importance_matches_what_ingest_kept(fed):
    s, frames = fed
    maps = {m.level: m for m in plots.token_importance(s, frames[5])}
    assert set(maps) == {"patch", "frame"}  # the one-frame levels
    frame, patch = maps["frame"], maps["patch"]
    assert frame.grid == s.model.grid and frame.kept.shape == s.model.grid
    assert int(frame.kept.sum()) == 19 and int(patch.kept.sum()) == 4 * 4
    for m in (frame, patch):
        for x in (m.attention, m.frequency, m.combined):
            assert x.shape == m.grid and 0.0 <= x.min() and x.max() <= 1.0 + 1e-6
    assert sorted(np.unique(patch.block).tolist()) == [0, 1, 2, 3]
    # the recomputed kept tokens are the ones the store holds for frame 5
    stored = s.backend.token_index("frame", torch.tensor([5]))[0]
    assert sorted(np.flatnonzero(frame.kept.reshape(-1)).tolist()) == sorted(stored.tolist())
    stored_patches = s.backend.token_index("patch", torch.arange(20, 24)).reshape(-1)
    assert sorted(np.flatnonzero(patch.kept.reshape(-1)).tolist()) == sorted(stored_patches.tolist())


def test_token_importance_png_and_errors(fed, tmp_path):
    s, frames = fed
    out = plots.plot_token_importance(s, frames[3], tmp_path / "tok.png", title="frame 3")
    w, h = png_size(out.read_bytes())
    assert w > 1000 and h > 500
    assert plots.plot_token_importance(s, torch.from_numpy(frames[3]), levels=["frame"])[:8] == PNG
    with pytest.raises(InputError, match="span several frames"):
        plots.token_importance(s, frames[0], levels=["segment"])
    with pytest.raises(InputError, match="unknown levels"):
        plots.token_importance(s, frames[0], levels=["nope"])
    with pytest.raises(InputError, match="one frame"):
        plots.token_importance(s, frames[:2])


def test_memory_snapshots_and_plot(tiny_model, frames, tmp_path):
    records = []
    with mukv.Session(model=tiny_model) as s:
        for i in range(3):
            s.feed(frames(8, seed=i))
            records.append(plots.memory_snapshot(s))
            plots.record_memory(s)
        assert plots.memory_history(s) == records
        out = plots.plot_memory(s, tmp_path / "m.png")  # from the history in the store
    assert [r["frames"] for r in records] == [8, 16, 24]
    assert set(records[-1]["tiers"]) == {"hot"}  # the memory backend holds everything in fast memory
    assert records[-1]["tiers"]["hot"] == sum(records[-1]["levels"].values())
    assert records[0]["levels"]["segment"] < records[-1]["levels"]["segment"]
    assert out.read_bytes()[:8] == PNG
    assert plots.plot_memory(records[:1])[:8] == PNG  # a single record still draws
    with pytest.raises(InputError, match="no memory records"):
        plots.plot_memory([], tmp_path / "x.png")
    (tmp_path / "a-file").write_text("x")
    for where in (tmp_path / "a-file" / "m.png", tmp_path, "/proc/mukv-none/m.png"):  # under a file; a folder; /proc
        with pytest.raises(InputError, match="cannot write the plot to"):
            plots.plot_memory(records, where)


def test_history_is_thinned_when_full(tiny_model, frames, monkeypatch):
    monkeypatch.setattr(plots, "MAX_HISTORY", 3)
    f = frames(5)
    with mukv.Session(model=tiny_model, config={"levels": [
            {"name": "frame", "extractor": "frame", "keep_ratio": 0.1, "top_k": 1}]}) as s:
        for i in range(5):
            s.feed(f[i])
            plots.record_memory(s)
        history = plots.memory_history(s)
    assert len(history) <= 3 and history[-1]["frames"] == 5
    assert [h["frames"] for h in history] == sorted(h["frames"] for h in history)


class _TieredStats:
    """A backend double reporting tiers the way the disk backend does."""

    name = "fake"

    def stats(self):
        return {"frame": {"blocks": 10, "tokens": 190, "bytes": 1900}, "segment": {"blocks": 2, "tokens": 20, "bytes": 400}}

    def tier_stats(self):
        return {"hot": {"blocks": {"frame": 4}, "budget_bytes": 1000}, "disk": {"committed": {"frame": 10, "segment": 1}}}


def test_level_tiers_reads_the_shapes_backends_report():
    tiers = plots.level_tiers(_TieredStats())
    assert tiers["frame"]["hot"] == {"blocks": 4, "tokens": 76, "bytes": 760}
    assert tiers["frame"]["disk"]["blocks"] == 10 and tiers["segment"]["disk"]["bytes"] == 200
    assert plots.tier_bytes(_TieredStats()) == {"hot": 760, "disk": 2100}
    nested = {"frame": {"hot": {"blocks": 1, "tokens": 2, "bytes": 3}, "disk": {"blocks": 4, "tokens": 5, "bytes": 6}}}
    assert plots.level_tiers(nested) == nested
    assert plots.level_tiers({"frame": {"blocks": 1, "tokens": 2, "bytes": 3}}) == \
        {"frame": {"all": {"blocks": 1, "tokens": 2, "bytes": 3}}}


def test_formatting_helpers():
    assert plots.format_bytes(1536) == "1.5 KiB" and plots.format_bytes(10) == "10 B"
    assert plots.format_time(75) == "1:15" and plots.format_time(3600 * 25 + 61) == "1d 1:01:01"


@pytest.mark.parametrize("history, words", [
    (5, "not a list"), ([5], "not an object"), ([{"frames": "x"}], "frames must be a count"),
    ([{"frames": 1, "time": "x", "levels": {}, "tiers": {}}], "time must be a finite number"),
    ([{"frames": 1, "time": 1.0, "levels": {"patch": "x"}, "tiers": {}}], "levels must map"),
])
def test_a_damaged_memory_history_is_left_out_and_heals(tiny_model, frames, tmp_path, caplog, history, words):
    # once an internal error in mukv plot memory, mukv inspect, and in mukv ingest after every chunk
    import json

    path = tmp_path / "s.mukv"
    with mukv.Session(model=tiny_model, backend="lancedb", path=path) as s:
        s.feed(frames(4))
        plots.record_memory(s)
    state = json.loads((path / "streams" / "default.json").read_text())
    state["values"]["memory_history"] = history
    (path / "streams" / "default.json").write_text(json.dumps(state))
    with mukv.Session.open(path, model=tiny_model) as s:
        assert plots.memory_history(s) == []
        assert words in caplog.text
        s.feed(frames(4, seed=1))
        plots.record_memory(s)  # the history starts again from the records that are whole
        assert [r["frames"] for r in plots.memory_history(s)] == [8]
    with pytest.raises(InputError, match="plot_memory: record 0: "):
        plots.plot_memory(history if isinstance(history, list) else [history])
