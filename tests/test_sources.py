"""Frame sources and feeding from a background thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

import mukv
from mukv.errors import InputError, UnknownPluginError
from test_session import write_mp4


def test_image_folder_source(tiny_model, frames, tmp_path):
    for i, f in enumerate(frames(5)):
        Image.fromarray(f).save(tmp_path / f"{i:03d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with mukv.Session(model=tiny_model) as s:
        assert s.feed_from("images", tmp_path, fps=1.0) == 5 * 4 + 5 + 1
        assert s.stats()["frames"] == 5 and s.stats()["last_time"] == 4.0


def test_iterator_source_continues_the_timeline(tiny_model, frames):
    with mukv.Session(model=tiny_model) as s:
        s.feed(frames(2))  # t = 0, 2
        s.feed_from("iterator", iter(list(frames(3, seed=4))), fps=0.5)
        assert s.stats()["last_time"] == pytest.approx(2.0 + 2.0 + 4.0)


def test_stream_source_reads_through_pyav(tiny_model, frames, tmp_path):
    video = tmp_path / "cam.mp4"
    write_mp4(video, frames(20, seed=2), fps=4)  # 5 s
    with mukv.Session(model=tiny_model) as s:
        s.feed_from("stream", str(video), fps=1.0)
        assert s.stats()["frames"] == 5
    with mukv.Session(model=tiny_model) as s:
        s.feed_from("stream", str(video), fps=2.0, max_frames=3)
        assert s.stats()["frames"] == 3


def test_background_feed_while_asking(tiny_model, frames, tmp_path):
    video = tmp_path / "clip.mp4"
    write_mp4(video, frames(40, seed=5), fps=4)  # 10 s
    with mukv.Session(model=tiny_model) as s:
        s.feed(frames(4))
        live = s.feed_from("video", video, fps=2.0, background=True, chunk=2)
        answers = []
        while live.running and len(answers) < 50:
            answers.append(s.ask("what moved?"))
        assert live.join(timeout=60) > 0
        assert s.stats()["frames"] == 4 + 20
        assert all(a.blocks for a in answers)


def test_background_feed_reports_errors_and_stops(tiny_model, frames):
    bad = [frames(1)[0], np.zeros((4, 4), np.uint8)]
    with mukv.Session(model=tiny_model) as s:
        live = s.feed_from("iterator", iter(bad), background=True, chunk=1)
        with pytest.raises(InputError, match="shape"):
            live.join(timeout=30)
        assert s.stats()["frames"] == 1  # what came before the bad frame is kept
        endless = (frames(1, seed=i)[0] for i in range(10**6))
        live = s.feed_from("iterator", endless, background=True, chunk=1)
        live.stop(timeout=30)
        assert not live.running


def test_bad_sources(tiny_model, tmp_path):
    with mukv.Session(model=tiny_model) as s:
        with pytest.raises(UnknownPluginError, match="registered sources"):
            s.feed_from("webcam3000", 0)
        with pytest.raises(InputError, match="not a folder"):
            s.feed_from("images", tmp_path / "nope")
        with pytest.raises(InputError, match="no image files"):
            s.feed_from("images", tmp_path)
        with pytest.raises(InputError, match="cannot open stream"):
            s.feed_from("stream", str(tmp_path / "missing.mp4"), timeout_s=2)
        with pytest.raises(InputError, match="fps"):
            s.feed_from("iterator", [], fps=-1)
        with pytest.raises(InputError, match="iterable"):
            s.feed_from("iterator", 5)
